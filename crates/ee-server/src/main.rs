//! `ee-server`: serves an EE-transformed model over HTTP. See the crate docs
//! of `ee_server` and `docs/protocol.md`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use ee_core::transform::sha256_file;
use ee_core::wire::ModelCard;
use ee_engine::{LlamaModel, Scheduler, SchedulerConfig};
use ee_server::config::ServerConfig;
use ee_server::validate::Limits;
use ee_server::{router, AppState, LoadedModel, SharedState};

#[derive(Parser)]
#[command(
    name = "ee-server",
    version,
    about = "Blind inference server for EE-transformed models"
)]
struct Args {
    /// The server artifact (EE-transformed GGUF) to host.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:8000).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// A TOML configuration file (see config/server.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn load(state: &SharedState, path: PathBuf) -> Result<()> {
    let started = Instant::now();
    let sha256 = sha256_file(&path)?;
    let model = LlamaModel::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let c = &state.config;
    let limits = Limits {
        vocab_size: model.vocab_size(),
        context_length: model.context_length(),
        max_n: c.max_n,
        max_logprobs: c.max_logprobs,
    };
    let card = ModelCard {
        id: c.model_id.clone(),
        object: "model".into(),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        owned_by: "ee".into(),
        artifact_sha256: sha256,
        vocab_size: model.vocab_size(),
        context_length: model.context_length(),
    };
    let scheduler = Scheduler::start(
        Arc::new(model),
        SchedulerConfig {
            max_batch: c.max_batch,
            max_queue: c.max_queue,
            step_token_budget: c.step_token_budget,
        },
    );
    let _ = state.model.set(LoadedModel {
        scheduler,
        limits,
        card,
    });
    tracing::info!(secs = started.elapsed().as_secs_f64(), "model ready");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: no new connections, finishing in-flight requests");
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    config.apply_env(|k| std::env::var(k).ok())?;
    if let Some(m) = args.model {
        config.model = Some(m);
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    let model_path = config
        .model
        .clone()
        .context("no model: pass --model PATH (or set model in the config, or EE_MODEL)")?;
    let api_keys = config.load_api_keys()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, auth = !api_keys.is_empty(), "listening; /health is 503 until the model is loaded");
    let state = AppState::new(config, api_keys);

    let loader = state.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = load(&loader, model_path) {
            tracing::error!("{e:#}");
            std::process::exit(1);
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}
