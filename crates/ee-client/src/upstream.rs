//! The blind server as the key holder sees it: an HTTP peer that takes and
//! returns encrypted token IDs. Generation always streams from it, so that a
//! client-side stop string can cancel the server's work at once.

use std::time::Duration;

use ee_api::sse::EventBuffer;

use ee_core::wire::{
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
    ErrorEnvelope, FinishReason, GenerationFields, ModelCard, ModelList, TokenLogprob,
};
use serde::Serialize;

/// Which generation endpoint of the server a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
        }
    }
}

/// A request to the blind server, typed: its prompts and stop tokens are
/// encrypted IDs, never text.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum UpstreamRequest {
    Chat(ChatCompletionRequest),
    Completion(CompletionRequest),
}

impl UpstreamRequest {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            UpstreamRequest::Chat(_) => Endpoint::Chat,
            UpstreamRequest::Completion(_) => Endpoint::Completion,
        }
    }

    /// The sampling and length fields, for the proxy's own defaults.
    pub fn fields_mut(&mut self) -> &mut GenerationFields {
        match self {
            UpstreamRequest::Chat(r) => &mut r.fields,
            UpstreamRequest::Completion(r) => &mut r.fields,
        }
    }

    /// Makes `ids` (encrypted) the single prompt. A chat request carries it
    /// as one message holding the whole rendered conversation: the server
    /// needs no turn boundaries, so it is not given them.
    pub fn set_prompt(&mut self, ids: Vec<u32>) {
        match self {
            UpstreamRequest::Chat(r) => {
                r.messages = vec![ee_core::wire::ChatMessage {
                    role: "user".into(),
                    content: ee_core::wire::MessageContent::Parts(vec![
                        ee_core::wire::ContentPart::TokenIds { token_ids: ids },
                    ]),
                }]
            }
            UpstreamRequest::Completion(r) => r.prompt = ee_core::wire::PromptInput::Tokens(ids),
        }
    }

    /// The `model` the server is asked for (`None`: the one it hosts).
    pub fn set_model(&mut self, model: Option<String>) {
        match self {
            UpstreamRequest::Chat(r) => r.model = model,
            UpstreamRequest::Completion(r) => r.model = model,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the blind server's address {0}")]
    InvalidUrl(String),
    #[error("cannot reach the blind server at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an error envelope (relayed as is: it names
    /// limits, never text).
    #[error("the blind server answered {status}: {}", .envelope.error.message)]
    Refused {
        status: u16,
        /// Boxed: an envelope is large, and errors travel on every path.
        envelope: Box<ErrorEnvelope>,
        retry_after: Option<String>,
    },
    /// The server refused the proxy's API key (401 or 403): the proxy's
    /// configuration, not the client's request, so never relayed as the
    /// client's authentication error.
    #[error(
        "the blind server at {url} refused this proxy's API key ({status}): give the proxy \
         the server's key with `--api-key` or EE_API_KEY"
    )]
    Unauthorized { url: String, status: u16 },
    #[error("the blind server sent something unexpected: {0}")]
    Protocol(String),
    /// The server sent nothing, not even a keep-alive, for too long.
    #[error("the blind server sent nothing for {0} s (a frozen or overloaded server)")]
    Timeout(u64),
}

/// How long the proxy waits on the blind server.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the response's headers.
    pub first_byte: Duration,
    /// Between two pieces of a streamed answer. The server sends a
    /// keep-alive every 15 s while it works, so this should exceed that.
    pub between_events: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            first_byte: Duration::from_secs(60),
            between_events: Duration::from_secs(60),
        }
    }
}

/// One choice's share of a streamed chunk, still encrypted.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerDelta {
    pub index: usize,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish_reason: Option<FinishReason>,
}

pub struct Upstream {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
    timeouts: Timeouts,
}

impl Upstream {
    /// A client for the server at `base_url`, an `http` or `https` URL.
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        timeouts: Timeouts,
    ) -> Result<Self, UpstreamError> {
        let scheme_ok = reqwest::Url::parse(base_url)
            .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
        if !scheme_ok {
            return Err(UpstreamError::InvalidUrl(format!(
                "{base_url:?} is not an http(s) URL; write it with its scheme, as in \
                 http://{}",
                base_url.trim_start_matches("//")
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| UpstreamError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            api_key,
            timeouts,
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => builder.bearer_auth(k),
            None => builder,
        }
    }

    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let limit = self.timeouts.first_byte;
        let response = tokio::time::timeout(limit, self.request(builder).send())
            .await
            .map_err(|_| UpstreamError::Timeout(limit.as_secs()))?
            .map_err(|e| UpstreamError::Unreachable {
                url: self.base.clone(),
                reason: error_chain(&e),
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        if matches!(status, 401 | 403) {
            return Err(UpstreamError::Unauthorized {
                url: self.base.clone(),
                status,
            });
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.unwrap_or_default();
        let envelope = serde_json::from_slice::<ErrorEnvelope>(&body).map_err(|_| {
            UpstreamError::Protocol(format!(
                "status {status} without an error envelope: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })?;
        Err(UpstreamError::Refused {
            status,
            envelope: Box::new(envelope),
            retry_after,
        })
    }

    /// The model the server hosts (the first of `/v1/models`), and the
    /// artifact the response names in its header. It gives up after
    /// [`MODEL_TIMEOUT`], so a frozen server cannot hang a readiness probe.
    pub async fn model(&self) -> Result<(ModelCard, Option<String>), UpstreamError> {
        let url = format!("{}/v1/models", self.base);
        let response = self.send(self.http.get(url).timeout(MODEL_TIMEOUT)).await?;
        let artifact = artifact_header(&response);
        let list: ModelList = response
            .json()
            .await
            .map_err(|e| UpstreamError::Protocol(format!("/v1/models: {e}")))?;
        let card = list
            .data
            .into_iter()
            .next()
            .ok_or_else(|| UpstreamError::Protocol("/v1/models lists no model".into()))?;
        Ok((card, artifact))
    }

    /// Posts `body` to the server's `path` (`/v1/embeddings`, `/classify`)
    /// and reads its JSON answer, and the artifact the response names.
    pub async fn post<T: Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<(R, Option<String>), UpstreamError> {
        let url = format!("{}{path}", self.base);
        let response = self.send(self.http.post(url).json(body)).await?;
        let artifact = artifact_header(&response);
        let limit = self.timeouts.between_events;
        let bytes = tokio::time::timeout(limit, response.bytes())
            .await
            .map_err(|_| UpstreamError::Timeout(limit.as_secs()))?
            .map_err(|e| UpstreamError::Protocol(format!("{path}: {}", error_chain(&e))))?;
        let answer = serde_json::from_slice(&bytes)
            .map_err(|e| UpstreamError::Protocol(format!("{path}: {e}")))?;
        Ok((answer, artifact))
    }

    /// Starts a streamed generation (`request` must ask to stream).
    pub async fn stream(&self, request: &UpstreamRequest) -> Result<ServerStream, UpstreamError> {
        let endpoint = request.endpoint();
        let url = format!("{}{}", self.base, endpoint.path());
        let response = self.send(self.http.post(url).json(request)).await?;
        let artifact = artifact_header(&response);
        Ok(ServerStream {
            endpoint,
            between_events: self.timeouts.between_events,
            artifact,
            response,
            events: EventBuffer::default(),
        })
    }
}

/// How long `/v1/models` may take.
pub const MODEL_TIMEOUT: Duration = Duration::from_secs(10);

/// The artifact a response names ([`ee_api::ARTIFACT_HEADER`]).
fn artifact_header(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(ee_api::ARTIFACT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// reqwest's errors say little at the top level ("error sending request");
/// the cause ("connection refused") is further down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The server's SSE stream. Dropping it closes the connection, which makes
/// the server cancel the sequences at once.
pub struct ServerStream {
    endpoint: Endpoint,
    between_events: Duration,
    /// The artifact fingerprint the server named for this answer.
    pub artifact: Option<String>,
    response: reqwest::Response,
    events: EventBuffer,
}

impl ServerStream {
    /// The next chunk's deltas (none for the usage chunk); `None` after
    /// `data: [DONE]`.
    pub async fn next(&mut self) -> Result<Option<Vec<ServerDelta>>, UpstreamError> {
        loop {
            if let Some(event) = self.events.next_event() {
                let Some(data) = event else {
                    continue; // a keep-alive comment
                };
                if data == "[DONE]" {
                    return Ok(None);
                }
                return parse_chunk(self.endpoint, &data).map(Some);
            }
            let limit = self.between_events;
            let chunk = tokio::time::timeout(limit, self.response.chunk())
                .await
                .map_err(|_| UpstreamError::Timeout(limit.as_secs()))?;
            match chunk {
                Ok(Some(bytes)) => self.events.push(&bytes),
                Ok(None) => {
                    return Err(UpstreamError::Protocol(
                        "the stream ended before [DONE]".into(),
                    ))
                }
                Err(e) => {
                    return Err(UpstreamError::Protocol(format!(
                        "the stream broke: {}",
                        error_chain(&e)
                    )))
                }
            }
        }
    }
}

fn parse_chunk(endpoint: Endpoint, data: &str) -> Result<Vec<ServerDelta>, UpstreamError> {
    let bad = |e: serde_json::Error| UpstreamError::Protocol(format!("chunk: {e}"));
    let value: serde_json::Value = serde_json::from_str(data).map_err(bad)?;
    if value.get("error").is_some() {
        let envelope: ErrorEnvelope = serde_json::from_value(value).map_err(bad)?;
        let status = if envelope.error.kind == "timeout_error" {
            504
        } else {
            500
        };
        return Err(UpstreamError::Refused {
            status,
            envelope: Box::new(envelope),
            retry_after: None,
        });
    }
    Ok(match endpoint {
        Endpoint::Chat => {
            let c: ChatCompletionResponse = serde_json::from_value(value).map_err(bad)?;
            c.choices
                .into_iter()
                .map(|ch| ServerDelta {
                    index: ch.index,
                    token_ids: ch.delta.map(|d| d.token_ids).unwrap_or_default(),
                    logprobs: ch.logprobs.map(|l| l.content).unwrap_or_default(),
                    finish_reason: ch.finish_reason,
                })
                .collect()
        }
        Endpoint::Completion => {
            let c: CompletionResponse = serde_json::from_value(value).map_err(bad)?;
            c.choices
                .into_iter()
                .map(|ch| ServerDelta {
                    index: ch.index,
                    token_ids: ch.token_ids,
                    logprobs: ch.logprobs.map(|l| l.content).unwrap_or_default(),
                    finish_reason: ch.finish_reason,
                })
                .collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_address_without_a_scheme_says_how_to_write_it() {
        let err = Upstream::new("127.0.0.1:8000", None, Timeouts::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("http://127.0.0.1:8000"), "{err}");
        assert!(Upstream::new("ftp://h", None, Timeouts::default()).is_err());
        assert!(Upstream::new("http://127.0.0.1:8000/", None, Timeouts::default()).is_ok());
    }

    #[test]
    fn chunks_parse_for_both_endpoints_and_errors_surface() {
        let chat = r#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":1,"delta":{"role":"assistant","content":null,"token_ids":[7]},"logprobs":null,"finish_reason":null}],"usage":null}"#;
        let c = parse_chunk(Endpoint::Chat, chat).unwrap();
        assert_eq!(c[0].index, 1);
        assert_eq!(c[0].token_ids, vec![7]);
        let cmpl = r#"{"id":"x","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":"","token_ids":[],"logprobs":null,"finish_reason":"length"}],"usage":null}"#;
        let c = parse_chunk(Endpoint::Completion, cmpl).unwrap();
        assert_eq!(c[0].finish_reason, Some(FinishReason::Length));
        let err = r#"{"error":{"message":"took too long","type":"timeout_error","param":null,"code":null}}"#;
        assert!(matches!(
            parse_chunk(Endpoint::Chat, err),
            Err(UpstreamError::Refused { status: 504, .. })
        ));
    }
}
