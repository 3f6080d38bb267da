//! `ee-server`: serves an EE-transformed model over HTTP. See the crate docs
//! of `ee_server` and `docs/protocol.md`.

use std::path::PathBuf;

#[global_allocator]
static ALLOCATOR: ee_engine::allocator::Allocator = ee_engine::allocator::Allocator;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ee_api::shutdown_signal;
use ee_server::config::ServerConfig;
use ee_server::serve::serve;
use ee_server::AppState;

#[derive(Parser)]
#[command(
    name = "ee-server",
    version,
    about = "Blind inference server for EE-transformed models"
)]
struct Args {
    /// The server artifact to host: an EE-transformed .gguf, or the
    /// directory `ee encrypt-model` wrote for a Hugging Face checkpoint.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A name the model answers to, repeatable (vLLM's flag); responses
    /// carry the first. Default: ee-model.
    #[arg(long = "served-model-name")]
    served_model_names: Vec<String>,
    /// Address to listen on (default 127.0.0.1:8000).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Serve a plaintext model (one that still carries a tokenizer or
    /// special-token IDs). It exposes the model's identity and skips the
    /// encryption: for baselines only.
    #[arg(long)]
    allow_plaintext: bool,
    /// A TOML configuration file (see config/server.toml).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    ee_engine::allocator::keep_freed_memory();
    ee_api::logging::init("info");
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
    config.allow_plaintext |= args.allow_plaintext;
    if !args.served_model_names.is_empty() {
        config.served_model_names = args.served_model_names;
    }
    let model_path = config
        .model
        .clone()
        .context("no model: pass --model PATH (or set model in the config, or EE_MODEL)")?;
    ee_api::check_origins(&config.cors_allowed_origins).map_err(anyhow::Error::msg)?;
    let api_keys = config.load_api_keys()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(listen = %config.listen, auth = !api_keys.is_empty(), "listening; /health is 503 until the model is loaded");
    let state = AppState::new(config, api_keys);

    let drain = Duration::from_secs(state.config.shutdown_drain_secs);
    let shutdown = async move {
        shutdown_signal().await;
        tracing::info!(
            drain_secs = drain.as_secs(),
            "shutting down: no new connections, finishing in-flight requests"
        );
        // What is still running at the deadline, or at a second signal, is
        // abandoned (as uvicorn and llama.cpp's server do), so a stalled
        // client cannot keep the process alive.
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown_signal() => tracing::warn!("second signal: exiting now"),
                _ = tokio::time::sleep(drain) => tracing::warn!("drain deadline passed: exiting with requests in flight"),
            }
            std::process::exit(1);
        });
    };
    serve(listener, state, model_path, shutdown).await?;
    Ok(())
}
