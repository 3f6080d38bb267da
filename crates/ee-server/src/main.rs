//! `ee-server`: the blind inference server.
//!
//! It hosts an EE-transformed model and will answer OpenAI-shaped requests
//! that carry encrypted token IDs only. It has no tokenizer, no chat template
//! and no key: by construction it cannot turn what it computes into text.
//!
//! This is the skeleton: it parses its command line and loads and checks the
//! server artifact. The HTTP API (axum) arrives with the blind-server issue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use ee_engine::LlamaModel;

#[derive(Parser)]
#[command(name = "ee-server", version, about = "Blind inference server for EE-transformed models")]
struct Args {
    /// The server artifact (EE-transformed GGUF) to host.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let started = Instant::now();
    let model = LlamaModel::load(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let c = &model.config;
    tracing::info!(
        architecture = %c.architecture,
        layers = c.n_layers,
        vocab = c.vocab_size,
        context = c.context_length,
        secs = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    anyhow::bail!("the HTTP API is not implemented yet; {} was not bound", args.listen)
}
