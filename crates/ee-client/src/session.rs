//! A key holder talking to one blind server: checks that the server hosts
//! this bundle's artifact, then runs generations whose plaintext never
//! leaves this process. The proxy and `ee chat` both drive it.

use ee_core::wire::{self, ModelCard, Usage};
use tokio::sync::OnceCell;

use crate::decode::{ChoiceDecoder, ChoiceDelta};
use crate::keyholder::KeyHolder;
use crate::proxy::request::{RequestError, Translated};
use crate::upstream::{Endpoint, ServerStream, Upstream, UpstreamError};
use crate::Error;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{}", .0.message)]
    Request(RequestError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The server hosts another artifact: nothing is sent to it.
    #[error("refusing the blind server at {url}: {reason}")]
    WrongServer { url: String, reason: String },
    /// The server's answer does not decrypt (another key's model, or a bug).
    #[error("the blind server's answer does not decrypt: {0}")]
    Decode(Error),
}

/// The answer length cap a session applies when a request names none: the
/// blind server's own default (`default_max_tokens`), so that an answer
/// that never stops ends long before the context does.
pub const DEFAULT_MAX_TOKENS: usize = 2048;

pub struct Session {
    pub keys: KeyHolder,
    pub upstream: Upstream,
    /// The names the proxy serves the model under (`--served-model-name`);
    /// empty: the server's own.
    pub served_model_names: Vec<String>,
    /// The answer length cap when a request names none (`max_tokens` and
    /// `max_completion_tokens` absent); `None` leaves it to the server.
    /// Never more than the room the longest prompt leaves in the context,
    /// so the default itself cannot overflow it.
    pub default_max_tokens: Option<usize>,
    /// The server's model card, once its artifact has been checked.
    verified: OnceCell<ModelCard>,
}

impl Session {
    pub fn new(keys: KeyHolder, upstream: Upstream) -> Self {
        Self {
            keys,
            upstream,
            served_model_names: Vec::new(),
            default_max_tokens: Some(DEFAULT_MAX_TOKENS),
            verified: OnceCell::new(),
        }
    }

    /// The server's model, checked against the bundle on first use. A server
    /// that is down is not cached as checked: the next call asks again.
    /// (Each answer is checked again; see [`generate`](Self::generate).)
    pub async fn server_model(&self) -> Result<&ModelCard, SessionError> {
        self.verified
            .get_or_try_init(|| self.check_server_now())
            .await
    }

    /// Asks the server for its model now and checks it against the bundle,
    /// both the card and the artifact the response names: readiness.
    pub async fn check_server_now(&self) -> Result<ModelCard, SessionError> {
        let (card, named) = self.upstream.model().await?;
        self.keys
            .check_server(&card)
            .map_err(|e| self.wrong_server(e.to_string()))?;
        self.check_named_artifact(named.as_deref())?;
        Ok(card)
    }

    /// Refuses a response that does not name the bundle's artifact.
    fn check_named_artifact(&self, named: Option<&str>) -> Result<(), SessionError> {
        let named = named.ok_or_else(|| {
            self.wrong_server(format!(
                "the server named no artifact ({})",
                ee_api::ARTIFACT_HEADER
            ))
        })?;
        self.keys
            .bundle()
            .check_server_artifact(named)
            .map_err(|e| self.wrong_server(e.to_string()))
    }

    fn wrong_server(&self, reason: String) -> SessionError {
        SessionError::WrongServer {
            url: self.upstream.base_url().to_owned(),
            reason,
        }
    }

    /// Posts an encoder request (encrypted IDs) to the server's `path` and
    /// returns its answer, from the bundle's artifact only.
    pub async fn pool<T: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        request: &T,
    ) -> Result<(R, &ModelCard), SessionError> {
        let card = self.server_model().await?;
        let (answer, named) = self.upstream.post(path, request).await?;
        self.check_named_artifact(named.as_deref())?;
        Ok((answer, card))
    }

    /// Sends a translated request and returns the running generation.
    pub async fn generate<'a>(
        &'a self,
        request: &'a Translated,
    ) -> Result<Generation<'a>, SessionError> {
        let card = self.server_model().await?;
        // A prompt that fills the context is the client's 400, found here
        // rather than as the server's body-size refusal or a broken stream.
        if let Some(p) = request
            .encrypted_prompts
            .iter()
            .find(|p| p.len() >= card.context_length)
        {
            let param = match request.endpoint {
                Endpoint::Chat => "messages",
                Endpoint::Completion => "prompt",
            };
            let mut e = crate::proxy::request::invalid(
                param,
                wire::prompt_fills_context(param, card.context_length, p.len()),
            );
            e.code = Some(wire::CONTEXT_LENGTH_EXCEEDED);
            return Err(SessionError::Request(e));
        }
        let mut upstream = request.upstream.clone();
        let fields = upstream.fields_mut();
        if let (None, None, Some(cap)) = (
            fields.max_tokens,
            fields.max_completion_tokens,
            self.default_max_tokens,
        ) {
            let longest = request.encrypted_prompts.iter().map(Vec::len).max();
            // Never negative: a prompt that fills the context is refused above.
            let room = card.context_length.saturating_sub(longest.unwrap_or(0));
            fields.max_tokens = Some(cap.min(room) as i64);
        }
        let stream = self.upstream.stream(&upstream).await?;
        // Every answer is checked, not only the first: a server re-deployed
        // with another key behind the same address would answer garbage.
        self.check_named_artifact(stream.artifact.as_deref())?;
        let decoders = (0..request.choices)
            .map(|_| ChoiceDecoder::new(&self.keys, request.stops.clone()))
            .collect();
        Ok(Generation {
            request,
            model: request.model.clone().unwrap_or_else(|| card.id.clone()),
            created: ee_api::unix_now(),
            stream: Some(stream),
            decoders,
        })
    }
}

/// One request in flight. Dropping it closes the server stream, which
/// cancels the server's work.
pub struct Generation<'a> {
    pub request: &'a Translated,
    pub model: String,
    pub created: u64,
    stream: Option<ServerStream>,
    pub decoders: Vec<ChoiceDecoder<'a>>,
}

impl Generation<'_> {
    /// The next deltas, by choice index; `None` once every choice has
    /// finished. When the last choice ends on a stop string, the server
    /// stream is dropped there and then.
    pub async fn next(&mut self) -> Result<Option<Vec<(usize, ChoiceDelta)>>, SessionError> {
        if self.decoders.iter().all(ChoiceDecoder::is_finished) {
            self.stream = None;
            return Ok(None);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        let Some(deltas) = stream.next().await? else {
            self.stream = None;
            if self.decoders.iter().all(ChoiceDecoder::is_finished) {
                return Ok(None);
            }
            return Err(UpstreamError::Protocol(
                "the stream ended before every choice finished".into(),
            )
            .into());
        };
        let mut out = Vec::with_capacity(deltas.len());
        for delta in &deltas {
            let decoder = self.decoders.get_mut(delta.index).ok_or_else(|| {
                UpstreamError::Protocol(format!(
                    "a chunk for choice {} of {}",
                    delta.index, self.request.choices
                ))
            })?;
            let was_finished = decoder.is_finished();
            let piece = decoder.push(delta).map_err(SessionError::Decode)?;
            if !was_finished {
                out.push((delta.index, piece));
            }
        }
        if self.decoders.iter().all(ChoiceDecoder::is_finished) {
            if let Some(mut stream) = self.stream.take() {
                // Finished by the server: read its [DONE] so the connection
                // can be reused. Cut by a stop string: drop it, cancelling.
                if !self.decoders.iter().any(|d| d.stopped_by_string) {
                    while let Ok(Some(_)) = stream.next().await {}
                }
            }
        }
        Ok(Some(out))
    }

    /// Token counts as the user sees them: plaintext prompt tokens, and the
    /// tokens each choice received (up to a stop string).
    pub fn usage(&self) -> Usage {
        let completion_tokens = self.decoders.iter().map(|d| d.completion_tokens).sum();
        Usage {
            prompt_tokens: self.request.prompt_tokens,
            completion_tokens,
            total_tokens: self.request.prompt_tokens + completion_tokens,
        }
    }
}
