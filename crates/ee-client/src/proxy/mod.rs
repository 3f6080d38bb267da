//! `ee proxy`: a local OpenAI-compatible endpoint. Any OpenAI client talks
//! plaintext to it on loopback; it forwards only encrypted token IDs to the
//! blind server and turns the answers back into text. It also serves the
//! small web chat page at `/`.

pub mod messages;
pub mod page;
pub mod pooling;
pub mod request;
pub mod response;
pub mod served;
pub mod tokenize;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ee_api::{read_json, response_id, sse, ApiError};
use ee_core::wire::{ErrorEnvelope, ModelCard};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::session::{Session, SessionError};
use crate::tools::parse::ToolCall;
use crate::tools::{ToolParsing, ToolStream};
use crate::upstream::{Endpoint, UpstreamError};
use request::translate;
use response::AnswerMeta;

/// The largest request body the proxy reads.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// The deepest JSON nesting it accepts.
pub const MAX_JSON_DEPTH: usize = 32;

/// The proxy's routes; `cors_origins` may call it from a browser (none by
/// default).
pub fn router(session: Arc<Session>, cors_origins: &[String]) -> Router {
    let app = Router::new()
        .route("/", get(page::chat_page))
        .route("/assets/{name}", get(page::asset))
        // Liveness: the proxy runs. Readiness: the server answers and hosts
        // the bundle's artifact (Kubernetes' two probes).
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/classify", post(classify))
        .route("/tokenize", post(tokenize_route))
        .route("/detokenize", post(detokenize_route))
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
        .with_state(session);
    match ee_api::cors_layer(cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// An error as the OpenAI client sees it: the proxy's own (a 400 naming the
/// parameter; 502 when the server is unreachable, wrong or garbled), or the
/// server's own envelope, relayed with its status.
enum ClientError {
    Own(ApiError),
    Relayed {
        status: StatusCode,
        envelope: ErrorEnvelope,
        retry_after: Option<String>,
    },
}

impl From<SessionError> for ClientError {
    fn from(e: SessionError) -> Self {
        let message = e.to_string();
        ClientError::Own(match e {
            SessionError::Request(r) if r.code == Some(served::MODEL_NOT_FOUND) => ApiError {
                param: r.param,
                ..ApiError::not_found(r.message).with_code(served::MODEL_NOT_FOUND)
            },
            SessionError::Request(r) => {
                let e = match r.param {
                    Some(p) => ApiError::invalid(&p, r.message),
                    None => ApiError::bad_request(r.message),
                };
                match r.code {
                    Some(code) => e.with_code(code),
                    None => e,
                }
            }
            SessionError::Upstream(UpstreamError::Refused {
                status,
                envelope,
                retry_after,
            }) => {
                return ClientError::Relayed {
                    status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    envelope: *envelope,
                    retry_after,
                }
            }
            SessionError::Upstream(
                UpstreamError::Unreachable { .. } | UpstreamError::InvalidUrl(_),
            ) => ApiError::bad_gateway(message, "upstream_unreachable"),
            SessionError::Upstream(UpstreamError::Unauthorized { .. }) => {
                ApiError::bad_gateway(message, "upstream_unauthorized")
            }
            SessionError::Upstream(UpstreamError::Protocol(_)) | SessionError::Decode(_) => {
                ApiError::bad_gateway(message, "upstream_protocol_error")
            }
            SessionError::WrongServer { .. } => ApiError::bad_gateway(message, "artifact_mismatch"),
            SessionError::Upstream(UpstreamError::Timeout(_)) => ApiError::gateway_timeout(message),
        })
    }
}

impl ClientError {
    /// The envelope alone, for an error that arrives mid-stream.
    fn envelope(&self) -> ErrorEnvelope {
        match self {
            ClientError::Own(e) => e.envelope(),
            ClientError::Relayed { envelope, .. } => envelope.clone(),
        }
    }
}

impl IntoResponse for ClientError {
    fn into_response(self) -> Response {
        match self {
            ClientError::Own(e) => e.into_response(),
            ClientError::Relayed {
                status,
                envelope,
                retry_after,
            } => {
                let mut response = (status, Json(envelope)).into_response();
                if let Some(v) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    response.headers_mut().insert(header::RETRY_AFTER, v);
                }
                response
            }
        }
    }
}

fn error_response(e: SessionError) -> Response {
    ClientError::from(e).into_response()
}

/// The model as the proxy shows it: no fingerprint, the context length
/// under OpenAI-compatible servers' names for it.
fn model_card(card: &ModelCard, id: &str) -> Value {
    json!({"id": id, "object": "model", "created": card.created, "owned_by": card.owned_by,
           "context_length": card.context_length, "max_model_len": card.context_length})
}

/// The names the model is shown under: the proxy's own, else the server's.
fn shown_names<'a>(session: &'a Session, card: &'a ModelCard) -> Vec<&'a str> {
    match session.served_model_names.is_empty() {
        true => vec![card.id.as_str()],
        false => session
            .served_model_names
            .iter()
            .map(String::as_str)
            .collect(),
    }
}

async fn models(State(session): State<Arc<Session>>) -> Response {
    match session.server_model().await {
        Ok(card) => {
            let data: Vec<Value> = shown_names(&session, card)
                .into_iter()
                .map(|id| model_card(card, id))
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => error_response(e),
    }
}

/// `GET /ready`: 200 when the blind server answers now with the bundle's
/// artifact, else 503 with the reason (unreachable, or another artifact).
async fn ready(State(session): State<Arc<Session>>) -> Response {
    match session.check_server_now().await {
        Ok(card) => Json(json!({"status": "ready", "model": card.id})).into_response(),
        Err(e) => {
            let envelope = ClientError::from(e).envelope();
            (StatusCode::SERVICE_UNAVAILABLE, Json(envelope)).into_response()
        }
    }
}

/// `GET /v1/models/{id}` (the SDK's `models.retrieve`).
async fn model(State(session): State<Arc<Session>>, Path(id): Path<String>) -> Response {
    match session.server_model().await {
        Ok(card) if shown_names(&session, card).contains(&id.as_str()) => {
            Json(model_card(card, &id)).into_response()
        }
        Ok(card) => ApiError::not_found(format!(
            "model {id:?} is not served here; this proxy serves {:?}",
            shown_names(&session, card)
        ))
        .with_code(served::MODEL_NOT_FOUND)
        .into_response(),
        Err(e) => error_response(e),
    }
}

async fn chat_completions(
    State(session): State<Arc<Session>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(session, headers, body, Endpoint::Chat).await
}

async fn completions(
    State(session): State<Arc<Session>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(session, headers, body, Endpoint::Completion).await
}

/// `POST /v1/embeddings` (OpenAI's), for an encoder's bundle.
async fn embeddings(
    State(session): State<Arc<Session>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    encoder_route(&session, headers, body, pooling::embeddings).await
}

/// `POST /classify` (vLLM's), for a classifier's bundle.
async fn classify(State(session): State<Arc<Session>>, headers: HeaderMap, body: Body) -> Response {
    encoder_route(&session, headers, body, pooling::classify).await
}

/// Reads an encoder request, runs it, answers its JSON or its error.
async fn encoder_route<'s, Req, Resp, Fut>(
    session: &'s Session,
    headers: HeaderMap,
    body: Body,
    run: fn(&'s Session, Req) -> Fut,
) -> Response
where
    Req: serde::de::DeserializeOwned,
    Resp: serde::Serialize,
    Fut: std::future::Future<Output = Result<Resp, SessionError>>,
{
    match read_json(&headers, body, MAX_BODY_BYTES, MAX_JSON_DEPTH).await {
        Ok(request) => match run(session, request).await {
            Ok(answer) => Json(answer).into_response(),
            Err(e) => error_response(e),
        },
        Err(e) => e.into_response(),
    }
}

/// `POST /tokenize` (vLLM's): plaintext, answered here, never forwarded.
async fn tokenize_route(
    State(session): State<Arc<Session>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    plaintext_tool(&session, headers, body, tokenize::tokenize).await
}

/// `POST /detokenize` (vLLM's): plaintext, answered here, never forwarded.
async fn detokenize_route(
    State(session): State<Arc<Session>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    plaintext_tool(&session, headers, body, tokenize::detokenize).await
}

async fn plaintext_tool(
    session: &Session,
    headers: HeaderMap,
    body: Body,
    tool: fn(
        &crate::keyholder::KeyHolder,
        &Map<String, Value>,
    ) -> Result<Value, request::RequestError>,
) -> Response {
    let body: Map<String, Value> =
        match read_json(&headers, body, MAX_BODY_BYTES, MAX_JSON_DEPTH).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
    match tool(&session.keys, &body) {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(SessionError::Request(e)),
    }
}

fn answer_id(endpoint: Endpoint) -> String {
    response_id(match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    })
}

async fn answer(
    session: Arc<Session>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let body: Map<String, Value> =
        match read_json(&headers, body, MAX_BODY_BYTES, MAX_JSON_DEPTH).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
    // Tokenizing and compiling a grammar take CPU time (a vocabulary's
    // grammar tables, once, about a second): off the async workers.
    let shared = session.clone();
    let translated = tokio::task::spawn_blocking(move || {
        let mut r = translate(&shared.keys, endpoint, &body)?;
        served::apply_served_names(&mut r, &shared.served_model_names)?;
        Ok(r)
    })
    .await;
    let request = match translated {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return error_response(SessionError::Request(e)),
        Err(_) => return ApiError::internal("the request's translation failed").into_response(),
    };
    tracing::info!(
        endpoint = endpoint.path(),
        stream = request.stream,
        prompt_tokens = request.prompt_tokens,
        choices = request.choices,
        "request"
    );
    if request.stream {
        return stream_answer(session, request).await;
    }
    let result = async {
        let mut generation = session.generate(&request).await?;
        while generation.next().await?.is_some() {}
        let meta = AnswerMeta::of(&generation, answer_id(endpoint));
        let tool_answers = match &request.tool_calls {
            Some(parsing) => generation
                .decoders
                .iter()
                .map(|d| d.text_with_specials().map(|text| parsing.parse(&text)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(SessionError::Decode)?,
            None => Vec::new(),
        };
        Ok::<_, SessionError>(meta.response(
            &generation.decoders,
            &generation.usage(),
            &tool_answers,
        ))
    }
    .await;
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => error_response(e),
    }
}

/// SSE in OpenAI's shape. Errors before the first token get their status;
/// later ones arrive as an error event. A client that goes away closes the
/// channel, the task drops the generation, and the server stream with it.
async fn stream_answer(session: Arc<Session>, request: request::Translated) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(64);
    let (started_tx, started_rx) = oneshot::channel::<Result<(), SessionError>>();
    tokio::spawn(async move {
        let mut generation = match session.generate(&request).await {
            Ok(g) => {
                let _ = started_tx.send(Ok(()));
                g
            }
            Err(e) => {
                let _ = started_tx.send(Err(e));
                return;
            }
        };
        let data = |v: Value| sse::data(&v);
        let meta = AnswerMeta::of(&generation, answer_id(request.endpoint));
        if request.trace {
            let _ = tx
                .send(data(meta.trace_chunk(&request.encrypted_prompts)))
                .await;
        }
        let mut first = vec![true; request.choices];
        let mut held: Vec<ToolStream> = match &request.tool_calls {
            Some(parsing) => (0..request.choices)
                .map(|_| ToolStream::new(parsing.format))
                .collect(),
            None => Vec::new(),
        };
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                next = generation.next() => next,
            };
            let deltas = match next {
                Ok(Some(d)) => d,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(data(json!(ClientError::from(e).envelope()))).await;
                    break;
                }
            };
            for (i, mut delta) in deltas {
                // Text that may begin a tool call waits until it is decided.
                let mut calls = Vec::new();
                if let (Some(stream), Some(parsing)) = (held.get_mut(i), &request.tool_calls) {
                    let decoder = &generation.decoders[i];
                    match tool_delta(stream, parsing, &session.keys, decoder, &mut delta) {
                        Ok(c) => calls = c,
                        Err(e) => {
                            let e = ClientError::from(SessionError::Decode(e));
                            let _ = tx.send(data(json!(e.envelope()))).await;
                            return;
                        }
                    }
                }
                let worth_sending = first[i]
                    || !delta.text.is_empty()
                    || delta.finish.is_some()
                    || !delta.logprobs.is_empty()
                    || request.trace;
                if worth_sending {
                    if tx
                        .send(data(meta.chunk(i, &delta, first[i])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    first[i] = false;
                }
                if !calls.is_empty()
                    && tx
                        .send(data(meta.tool_calls_chunk(i, &calls)))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }
        if request.include_usage {
            let _ = tx.send(data(meta.usage_chunk(&generation.usage()))).await;
        }
        let _ = tx.send(sse::done()).await;
    });
    match started_rx.await {
        Ok(Ok(())) => sse::response(rx),
        Ok(Err(e)) => error_response(e),
        Err(_) => ApiError::internal("the request task ended early").into_response(),
    }
}

/// Passes a streamed delta through its choice's tool-call hold-back: what
/// can be shown now stays in `delta.text`; at the end of the answer, the
/// calls, if it parsed as calls (and then the choice's end moves to the
/// calls' chunk).
fn tool_delta(
    stream: &mut ToolStream,
    parsing: &ToolParsing,
    keys: &crate::keyholder::KeyHolder,
    decoder: &crate::decode::ChoiceDecoder<'_>,
    delta: &mut crate::decode::ChoiceDelta,
) -> Result<Vec<ToolCall>, crate::Error> {
    let plain = keys.decrypt(&delta.encrypted_ids)?;
    if plain.iter().any(|id| parsing.trigger_ids.contains(id)) {
        stream.start();
    }
    delta.text = stream.push(&delta.text);
    if delta.finish.is_none() {
        return Ok(Vec::new());
    }
    let end = stream.finish(parsing, &decoder.text_with_specials()?);
    delta.text.push_str(&end.content);
    if !end.calls.is_empty() {
        delta.finish = None;
    }
    Ok(end.calls)
}
