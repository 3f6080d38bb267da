//! A key holder talking to one blind server: checks that the server hosts
//! this bundle's artifact, then runs generations whose plaintext never
//! leaves this process. The proxy and `ee chat` both drive it.

use ee_core::wire::{self, ModelCard, Usage};
use tokio::sync::OnceCell;

use crate::decode::{ChoiceDecoder, ChoiceDelta};
use crate::keyholder::KeyHolder;
use crate::proxy::request::{RequestError, Translated};
use crate::structured::Constraint;
use crate::upstream::{
    Endpoint, ServerDelta, ServerStream, Upstream, UpstreamError, UpstreamRequest,
};
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
        // A structured answer restarts after the tokens it accepted: the
        // server keeps each prompt, so a restart prefills only those.
        if request.constraint.is_some() {
            upstream.fields_mut().cache_prompt = true;
        }
        let guided = request.constraint.clone().map(|constraint| Guided {
            constraint,
            prompt: request
                .encrypted_prompts
                .first()
                .cloned()
                .unwrap_or_default(),
            context_room: card
                .context_length
                .saturating_sub(request.encrypted_prompts.first().map_or(0, Vec::len))
                as i64,
            upstream: upstream.clone(),
            accepted: Vec::new(),
            restarted: false,
        });
        let decoders = (0..request.choices)
            .map(|_| {
                let logprobs = request.logprobs != crate::proxy::request::LogprobsShape::None;
                ChoiceDecoder::new(&self.keys, request.stops.clone(), logprobs)
            })
            .collect();
        let mut generation = Generation {
            session: self,
            request,
            model: request.model.clone().unwrap_or_else(|| card.id.clone()),
            created: ee_api::unix_now(),
            stream: None,
            decoders,
            guided,
            pending: Vec::new(),
        };
        // A structured answer starts as a restart does: with the tokens its
        // grammar forces, and its first sampled token drawn from the
        // grammar's set (most answers would begin off it: prose, not `{`).
        match generation.guided.is_some() {
            true => {
                let mut out = Vec::new();
                generation.restart(&mut out).await?;
                generation.pending = out;
            }
            false => generation.stream = Some(self.open_stream(&upstream).await?),
        }
        Ok(generation)
    }

    /// Starts a server stream and checks the artifact it names: every
    /// answer is checked, not only the first, since a server re-deployed
    /// with another key behind the same address would answer garbage.
    async fn open_stream(&self, upstream: &UpstreamRequest) -> Result<ServerStream, SessionError> {
        let stream = self.upstream.stream(upstream).await?;
        self.check_named_artifact(stream.artifact.as_deref())?;
        Ok(stream)
    }
}

/// One request in flight. Dropping it closes the server stream, which
/// cancels the server's work.
pub struct Generation<'a> {
    session: &'a Session,
    pub request: &'a Translated,
    pub model: String,
    pub created: u64,
    stream: Option<ServerStream>,
    pub decoders: Vec<ChoiceDecoder<'a>>,
    /// Structured output's state (one choice).
    guided: Option<Guided>,
    /// Deltas made before the first call of [`next`](Self::next) (tokens a
    /// grammar forces at the start).
    pending: Vec<(usize, ChoiceDelta)>,
}

/// Where a structured answer goes from its accepted tokens.
struct Continuation {
    /// Tokens the grammar forced, encrypted, now part of the answer.
    forced: Vec<u32>,
    /// The request that goes on, unless the answer ends here.
    next: Option<UpstreamRequest>,
    /// How it ends here: complete (`stop`) or at the length cap.
    end: Option<wire::FinishReason>,
}

/// A structured answer, driven by the optimistic protocol of
/// `docs/protocol.md`: the server samples freely; each token is checked
/// against the grammar here; at the first token the grammar refuses, the
/// stream is dropped and a new one starts after the accepted tokens, its
/// first token drawn from the grammar's set (`first_token_mask`).
struct Guided {
    constraint: Constraint,
    /// The request as first sent (after the session's defaults).
    upstream: UpstreamRequest,
    /// Its prompt (encrypted): constrained requests have one.
    prompt: Vec<u32>,
    /// Answer tokens the context leaves room for after the prompt.
    context_room: i64,
    /// Accepted answer tokens, encrypted.
    accepted: Vec<u32>,
    /// The current stream's next token is its first, drawn from the mask.
    restarted: bool,
}

/// The grammar engine failed inside (its message).
fn grammar_failed(e: String) -> SessionError {
    SessionError::Decode(Error::Tokenizer(format!("llguidance: {e}")))
}

impl Guided {
    /// Keeps the leading tokens of `delta` that the grammar accepts.
    /// Returns the delta to decode and whether the stream must restart.
    fn filter(
        &mut self,
        keys: &KeyHolder,
        mut delta: ServerDelta,
    ) -> Result<(ServerDelta, bool), SessionError> {
        let plain = keys
            .decrypt(&delta.token_ids)
            .map_err(SessionError::Decode)?;
        let mut kept = 0;
        let mut refused = false;
        for &token in &plain {
            let ok = self.constraint.accept(token).map_err(grammar_failed)?;
            if !ok {
                // The first token of a restarted stream was drawn from the
                // grammar's own set: a refusal there is the server's fault.
                if self.restarted {
                    return Err(UpstreamError::Protocol(
                        "the server ignored first_token_mask".into(),
                    )
                    .into());
                }
                refused = true;
                break;
            }
            kept += 1;
            self.restarted = false;
            if self.constraint.is_complete() {
                break;
            }
        }
        self.accepted.extend_from_slice(&delta.token_ids[..kept]);
        delta.token_ids.truncate(kept);
        delta.logprobs.truncate(kept);
        if self.constraint.is_complete() {
            delta.finish_reason = Some(wire::FinishReason::Stop);
        } else if refused || kept < plain.len() {
            delta.finish_reason = None;
        }
        Ok((delta, refused))
    }

    /// What follows the accepted tokens: the tokens the grammar forces,
    /// then the request that goes on after them, its first token drawn
    /// from the grammar's set; or the end, when the grammar is complete or
    /// the length cap reached.
    fn continuation(&mut self, keys: &KeyHolder) -> Result<Continuation, SessionError> {
        let mut next = self.upstream.clone();
        let fields = next.fields_mut();
        let cap = fields.max_tokens.or(fields.max_completion_tokens);
        let mut forced = self
            .constraint
            .forced(keys.codec())
            .map_err(grammar_failed)?;
        // Never past the context: the server would refuse the restart.
        let cap = Some(cap.map_or(self.context_room, |c| c.min(self.context_room)));
        let mut cut = false;
        if let Some(cap) = cap {
            let room = (cap - self.accepted.len() as i64).max(0) as usize;
            cut = forced.len() > room;
            forced.truncate(room);
        }
        let forced = keys.encrypt(&forced).map_err(SessionError::Decode)?;
        self.accepted.extend_from_slice(&forced);
        let left = cap.map(|c| c - self.accepted.len() as i64);
        let end = match () {
            _ if cut => Some(wire::FinishReason::Length),
            _ if self.constraint.is_complete() => Some(wire::FinishReason::Stop),
            _ if left.is_some_and(|l| l <= 0) => Some(wire::FinishReason::Length),
            _ => None,
        };
        if end.is_some() {
            return Ok(Continuation {
                forced,
                next: None,
                end,
            });
        }
        fields.max_tokens = left;
        fields.max_completion_tokens = None;
        // A seeded answer stays reproducible: each restart position has
        // its own seed, the same on every stack.
        fields.seed = fields.seed.map(|s| {
            s.wrapping_add((self.accepted.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        });
        let mask = self.constraint.mask().map_err(grammar_failed)?;
        let mask = keys.encrypt_mask(&mask).map_err(SessionError::Decode)?;
        fields.first_token_mask = Some(mask.to_base64());
        next.set_prompt([&self.prompt[..], &self.accepted[..]].concat());
        self.restarted = true;
        Ok(Continuation {
            forced,
            next: Some(next),
            end: None,
        })
    }
}

impl Generation<'_> {
    /// The next deltas, by choice index; `None` once every choice has
    /// finished. When the last choice ends on a stop string, the server
    /// stream is dropped there and then.
    pub async fn next(&mut self) -> Result<Option<Vec<(usize, ChoiceDelta)>>, SessionError> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
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
        let (deltas, restart) = match self.guided.as_mut() {
            Some(g) => {
                let mut kept = Vec::with_capacity(deltas.len());
                let mut restart = false;
                for d in deltas {
                    let (d, refused) = g.filter(&self.session.keys, d)?;
                    kept.push(d);
                    // Nothing after a refused token follows from the answer.
                    if refused {
                        restart = true;
                        break;
                    }
                }
                (kept, restart)
            }
            None => (deltas, false),
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
        if restart && !self.decoders.iter().all(ChoiceDecoder::is_finished) {
            self.stream = None;
            self.restart(&mut out).await?;
        }
        if self.decoders.iter().all(ChoiceDecoder::is_finished) {
            if let Some(mut stream) = self.stream.take() {
                // Finished by the server: read its [DONE] so the connection
                // can be reused. Cut by a stop string or a complete grammar:
                // drop it, cancelling.
                let cut = self
                    .guided
                    .as_ref()
                    .is_some_and(|g| g.constraint.is_complete());
                if !cut && !self.decoders.iter().any(|d| d.stopped_by_string) {
                    while let Ok(Some(_)) = stream.next().await {}
                }
            }
        }
        Ok(Some(out))
    }

    /// Goes on after a structured answer's accepted tokens: the tokens its
    /// grammar forces are decoded into `out`, then the next stream starts,
    /// unless the answer ends there (complete, or at the length cap).
    async fn restart(&mut self, out: &mut Vec<(usize, ChoiceDelta)>) -> Result<(), SessionError> {
        let Some(guided) = self.guided.as_mut() else {
            return Ok(());
        };
        let step = guided.continuation(&self.session.keys)?;
        if !step.forced.is_empty() || step.end.is_some() {
            let delta = ServerDelta {
                index: 0,
                token_ids: step.forced,
                logprobs: Vec::new(),
                finish_reason: step.end,
            };
            let piece = self.decoders[0]
                .push(&delta)
                .map_err(SessionError::Decode)?;
            out.push((0, piece));
        }
        // (A stop string in the forced text may have ended the answer.)
        if let (Some(next), false) = (step.next, self.decoders[0].is_finished()) {
            self.stream = Some(self.session.open_stream(&next).await?);
        }
        Ok(())
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
