//! `ee-server`: the blind inference server.
//!
//! It hosts an EE-transformed model and answers OpenAI-shaped requests whose
//! prompts and answers are encrypted token IDs. It has no tokenizer, no chat
//! template and no key: it cannot turn what it computes into text. This
//! crate is the HTTP layer only; batching and sampling live in `ee-engine`.

pub mod config;
pub mod metrics;
pub mod pooling;
pub mod routes;
pub mod serve;
pub mod validate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ee_api::ApiError;
use ee_core::wire::ModelCard;
use ee_engine::{EncodeQueue, Scheduler};
use subtle::ConstantTimeEq;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::pooling::PoolingLimits;
use crate::validate::Limits;

/// What runs the model: a causal LM's scheduler, or an encoder's queue.
pub enum Engine {
    Causal {
        scheduler: Scheduler,
        limits: Limits,
    },
    Encoder {
        queue: EncodeQueue,
        limits: PoolingLimits,
    },
}

/// The model once it is loaded.
pub struct LoadedModel {
    pub engine: Engine,
    /// One card per served name.
    pub cards: Vec<ModelCard>,
    /// The name responses carry: the first served name.
    pub name: String,
    /// The artifact's fingerprint, as a header value.
    pub artifact_header: HeaderValue,
}

impl LoadedModel {
    /// The card of a served name.
    pub fn card(&self, name: &str) -> Option<&ModelCard> {
        self.cards.iter().find(|c| c.id == name)
    }

    /// The causal LM's scheduler and limits; a 400 on an encoder's server.
    pub fn causal(&self) -> Result<(&Scheduler, &Limits), ApiError> {
        match &self.engine {
            Engine::Causal { scheduler, limits } => Ok((scheduler, limits)),
            Engine::Encoder { .. } => Err(ApiError::bad_request(
                "this server hosts an encoder, which does not generate text; use /v1/embeddings \
                 or /classify",
            )
            .with_code("model_not_supported")),
        }
    }

    /// The encoder's queue and limits; a 400 on a causal LM's server.
    pub fn encoder(&self) -> Result<(&EncodeQueue, &PoolingLimits), ApiError> {
        match &self.engine {
            Engine::Encoder { queue, limits } => Ok((queue, limits)),
            Engine::Causal { .. } => Err(ApiError::bad_request(
                "this server hosts a causal language model, not an encoder; use \
                 /v1/completions or /v1/chat/completions",
            )
            .with_code("model_not_supported")),
        }
    }
}

pub struct AppState {
    pub config: ServerConfig,
    pub api_keys: Vec<String>,
    /// Empty while the model loads: `/health` answers 503 until it is set.
    pub model: OnceLock<LoadedModel>,
    pub metrics: Metrics,
    next_request: AtomicU64,
}

impl AppState {
    pub fn new(config: ServerConfig, api_keys: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            config,
            api_keys,
            model: OnceLock::new(),
            metrics: Metrics::default(),
            next_request: AtomicU64::new(1),
        })
    }

    pub fn loaded(&self) -> Result<&LoadedModel, ApiError> {
        self.model.get().ok_or_else(ApiError::loading)
    }
}

pub type SharedState = Arc<AppState>;

/// The whole HTTP surface.
pub fn router(state: SharedState) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*id}", get(routes::model))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/embeddings", post(pooling::embeddings))
        .route("/classify", post(pooling::classify))
        .route("/metrics", get(routes::metrics))
        // Inner layer: only authenticated responses name the artifact.
        .route_layer(middleware::from_fn_with_state(state.clone(), name_artifact))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let mut app = Router::new()
        .route("/health", get(routes::health))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state.clone());
    if let Some(cors) = ee_api::cors_layer(&state.config.cors_allowed_origins) {
        app = app.layer(cors);
    }
    app
}

/// Bearer API keys, compared in constant time. `/health` is not behind it.
async fn authenticate(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        state.api_keys.iter().fold(false, |acc, k| {
            acc | bool::from(k.as_bytes().ct_eq(g.as_bytes()))
        })
    });
    if !ok {
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
}

/// Request ids, sizes, timings and status metrics. Never bodies: token IDs
/// are not logged at any level.
async fn observe(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let id = state.next_request.fetch_add(1, Ordering::Relaxed);
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let bytes = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let started = Instant::now();
    let mut response = next.run(req).await;
    let status = response.status().as_u16();
    state.metrics.record_status(status);
    if let Ok(v) = HeaderValue::from_str(&format!("req-{id}")) {
        response.headers_mut().insert("x-request-id", v);
    }
    // Logged when the body is done (or dropped by a client that left), so a
    // streamed answer logs its real duration, not its time to headers.
    let headers_ms = started.elapsed().as_millis() as u64;
    response.map(|body| {
        axum::body::Body::new(LoggedBody {
            inner: body,
            on_done: Some(Box::new(move || {
                tracing::info!(request_id = id, %method, path, request_bytes = bytes, status,
                    ms = started.elapsed().as_millis() as u64, headers_ms, "request");
            })),
        })
    })
}

/// A response body that runs `on_done` once, when it is dropped: after its
/// last frame, or when the client goes away mid-stream.
struct LoggedBody {
    inner: axum::body::Body,
    on_done: Option<Box<dyn FnOnce() + Send>>,
}

impl axum::body::HttpBody for LoggedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(done) = self.on_done.take() {
            done();
        }
    }
}

/// Names the artifact on every authenticated response once the model is
/// loaded, so the key holder checks each answer (see
/// [`ee_api::ARTIFACT_HEADER`]).
async fn name_artifact(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    if let Some(loaded) = state.model.get() {
        response
            .headers_mut()
            .insert(ee_api::ARTIFACT_HEADER, loaded.artifact_header.clone());
    }
    response
}
