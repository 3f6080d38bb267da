//! Running the server: load the model in the background while already
//! answering (`/health` is 503 until it is ready), serve until told to stop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ee_core::wire::ModelCard;
use ee_engine::{
    EncodeQueue, EncodeQueueConfig, LoadOptions, ModelFiles, Scheduler, SchedulerConfig,
};
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::pooling::PoolingLimits;
use crate::validate::Limits;
use crate::{router, Engine, LoadedModel, SharedState};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading {0}: {1}")]
    Engine(PathBuf, ee_engine::Error),
    #[error(
        "{0} is a plaintext model, not a server artifact: it carries {1}. Serve the artifact \
         that `ee encrypt-model` writes; --allow-plaintext (EE_ALLOW_PLAINTEXT=true) serves \
         it anyway, exposing the model's identity and skipping the encryption"
    )]
    Plaintext(PathBuf, String),
    #[error("the model loader panicked")]
    LoaderPanicked,
    /// A setting out of range, named.
    #[error("{0}")]
    Config(String),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Loads the artifact and installs it in `state`, which makes the server ready.
pub fn load_model(state: &SharedState, path: &Path) -> Result<(), ServeError> {
    let started = Instant::now();
    let engine_err = |e| ServeError::Engine(path.into(), e);
    let files = ModelFiles::open(path).map_err(engine_err)?;
    let plaintext = files.client_side_data();
    if !plaintext.is_empty() {
        let shown = match plaintext.len() {
            n if n > 4 => format!("{} and {} more", plaintext[..4].join(", "), n - 4),
            _ => plaintext.join(", "),
        };
        if !state.config.allow_plaintext {
            return Err(ServeError::Plaintext(path.into(), shown));
        }
        tracing::warn!(model = %path.display(), carries = %shown, "SERVING A PLAINTEXT MODEL (--allow-plaintext): token IDs on the wire are plaintext and the model is identifiable");
    }
    let sha256 = files.sha256();
    let c = &state.config;
    let (engine, vocab_size, context_length) = match files.is_encoder() {
        true => {
            let model = files.load_encoder().map_err(engine_err)?;
            let limits = PoolingLimits {
                vocab_size: model.vocab_size(),
                max_positions: model.max_positions(),
                hidden_size: model.hidden_size(),
                num_labels: model.num_labels(),
            };
            let queue = EncodeQueue::start(
                model,
                EncodeQueueConfig {
                    max_batch_tokens: c.encoder_batch_tokens,
                    max_queue: c.max_queue,
                },
            );
            let (v, p) = (limits.vocab_size, limits.max_positions);
            (Engine::Encoder { queue, limits }, v, p)
        }
        false => {
            let opts = LoadOptions {
                kv_cache_dtype: c.kv_cache_dtype,
                ..Default::default()
            };
            let model = files.load(&opts).map_err(engine_err)?;
            let (vocab_size, model_context) = (model.vocab_size(), model.context_length());
            let scheduler = Scheduler::start(
                model,
                SchedulerConfig {
                    max_batch: c.max_batch,
                    max_queue: c.max_queue,
                    step_token_budget: c.step_token_budget,
                    kv_cache_bytes: c.kv_cache_mib.saturating_mul(1 << 20),
                    prompt_cache_bytes: c.prompt_cache_mib.saturating_mul(1 << 20),
                },
            );
            // A sequence's prompt and answer must fit the KV pool as well
            // as the model's context: the smaller is the context served.
            let pool = scheduler.kv_pool_tokens();
            if pool == 0 {
                return Err(ServeError::Config(format!(
                    "kv_cache_mib = {} holds no block of the KV cache for this model",
                    c.kv_cache_mib
                )));
            }
            if pool < model_context {
                tracing::warn!(
                    kv_pool_tokens = pool,
                    model_context,
                    "the KV pool (kv_cache_mib) is smaller than the model's context: \
                     requests are limited to the pool"
                );
            }
            let limits = Limits {
                vocab_size,
                context_length: model_context.min(pool),
                max_n: c.max_n,
                max_logprobs: c.max_logprobs,
                default_max_tokens: (c.default_max_tokens > 0).then_some(c.default_max_tokens),
            };
            let (v, p) = (vocab_size, limits.context_length);
            (Engine::Causal { scheduler, limits }, v, p)
        }
    };
    let created = ee_api::unix_now();
    let mut names = c.served_model_names.clone();
    if names.is_empty() {
        // An empty list in the config still leaves the model a name.
        names.push(ServerConfig::default().served_model_names[0].clone());
    }
    let cards: Vec<ModelCard> = names
        .iter()
        .map(|id| ModelCard {
            id: id.clone(),
            object: "model".into(),
            created,
            owned_by: "ee".into(),
            artifact_sha256: sha256.clone(),
            vocab_size,
            context_length,
        })
        .collect();
    let artifact_header = axum::http::HeaderValue::from_str(&sha256)
        .map_err(|e| ServeError::Io(std::io::Error::other(e)))?;
    let _ = state.model.set(LoadedModel {
        engine,
        cards,
        name: names[0].clone(),
        artifact_header,
    });
    tracing::info!(secs = started.elapsed().as_secs_f64(), "model ready");
    Ok(())
}

/// Serves on `listener` while the model at `model_path` loads, until
/// `shutdown` resolves (then in-flight requests finish) or loading fails.
pub async fn serve(
    listener: TcpListener,
    state: SharedState,
    model_path: PathBuf,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let loader = state.clone();
    let load = tokio::task::spawn_blocking(move || load_model(&loader, &model_path));
    let limits = ee_api::serve::ConnectionLimits::from_secs(
        state.config.header_read_timeout_secs,
        "header_read_timeout_secs",
    )
    .map_err(ServeError::Config)?;
    let server = ee_api::serve::serve(listener, router(state), limits, shutdown);
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => Ok(served?),
        loaded = load => match loaded {
            Ok(Ok(())) => Ok(server.await?),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ServeError::LoaderPanicked),
        },
    }
}
