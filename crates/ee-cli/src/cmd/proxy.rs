//! `ee proxy`: the local OpenAI-compatible endpoint in front of a blind server.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use ee_client::keyholder::KeyHolder;
use ee_client::proxy::router;
use ee_client::session::{Session, SessionError, DEFAULT_MAX_TOKENS};
use ee_client::template::ChatFormat;
use ee_client::upstream::{Timeouts, Upstream, UpstreamError};
use tokio::net::TcpListener;

#[derive(Args)]
pub(crate) struct ProxyArgs {
    /// The client bundle (from `ee encrypt-model --client-out`).
    #[arg(long, env = "EE_BUNDLE")]
    bundle: PathBuf,
    /// Base URL of the blind server.
    #[arg(long, env = "EE_SERVER_URL", default_value = "http://127.0.0.1:8000")]
    server: String,
    /// Where OpenAI clients connect. Keep it on loopback: plaintext is served here.
    #[arg(long, env = "EE_PROXY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// How conversations become prompts: `llama-cpp` (plain ChatML for
    /// ChatML models, as llama.cpp's server) or `gguf` (the shipped template).
    #[arg(long, value_enum, default_value_t = ChatFormat::LlamaCpp)]
    chat_format: ChatFormat,
    /// Bearer key for the blind server, if it wants one.
    #[arg(long, env = "EE_API_KEY")]
    api_key: Option<String>,
    /// Browser origins allowed to call the proxy (CORS), comma-separated;
    /// `*` for any. None by default.
    #[arg(long, env = "EE_PROXY_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    cors_allowed_origins: Vec<String>,
    /// Seconds to wait for the blind server's response headers; past them
    /// the client gets 504.
    #[arg(long, env = "EE_PROXY_FIRST_BYTE_TIMEOUT_SECS", default_value_t = 60)]
    first_byte_timeout_secs: u64,
    /// Seconds the blind server may send nothing (not even the keep-alive
    /// it sends every 15 s) in the middle of an answer; past them the
    /// client gets 504, or an error event in a stream.
    #[arg(long, env = "EE_PROXY_EVENT_TIMEOUT_SECS", default_value_t = 60)]
    event_timeout_secs: u64,
    /// Seconds a client may take to send a request's headers (or sit idle
    /// between requests on a kept-alive connection) before it is closed;
    /// also the longest pause inside a request body (then 408).
    #[arg(long, env = "EE_PROXY_HEADER_READ_TIMEOUT_SECS", default_value_t = 30)]
    header_read_timeout_secs: u64,
    /// A name the model answers to here, repeatable (vLLM's flag): the
    /// proxy lists these, accepts only these, and answers with the one
    /// asked for (else the first). Default: the server's name.
    #[arg(long = "served-model-name")]
    served_model_names: Vec<String>,
    /// The answer length cap for a request that sets neither `max_tokens`
    /// nor `max_completion_tokens` (never more than the context leaves);
    /// 0 leaves it to the server's own default.
    #[arg(long, env = "EE_PROXY_DEFAULT_MAX_TOKENS", default_value_t = DEFAULT_MAX_TOKENS)]
    default_max_tokens: usize,
}

/// The key holder plus a client for the server, with the session's
/// defaults (callers such as `ee proxy` adjust them).
pub(crate) fn session(
    bundle: &std::path::Path,
    format: ChatFormat,
    server: &str,
    api_key: Option<String>,
    timeouts: Timeouts,
) -> Result<Session> {
    let keys = KeyHolder::load(bundle, format)
        .with_context(|| format!("loading bundle {}", bundle.display()))?;
    Ok(Session::new(
        keys,
        Upstream::new(server, api_key, timeouts)?,
    ))
}

/// Checks the server now. A wrong server stops the proxy; an unreachable one
/// is only reported, since it may still be starting, and so is a refused
/// API key (requests get 502 meanwhile).
pub(crate) async fn check_server(session: &Session) -> Result<()> {
    match session.server_model().await {
        Ok(card) => {
            tracing::info!(model = %card.id, sha256 = %card.artifact_sha256, "server artifact matches the bundle");
            Ok(())
        }
        Err(e @ SessionError::WrongServer { .. }) => Err(e.into()),
        Err(e) => {
            let until = match e {
                SessionError::Upstream(UpstreamError::Unauthorized { .. }) => {
                    "the proxy has its key"
                }
                _ => "it is up",
            };
            tracing::warn!("{e}; requests will be answered 502 until {until}");
            Ok(())
        }
    }
}

pub(crate) async fn serve(
    listener: TcpListener,
    session: Arc<Session>,
    cors_origins: &[String],
    limits: ee_api::serve::ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    ee_api::serve::serve(listener, router(session, cors_origins), limits, shutdown)
        .await
        .context("serving the proxy")
}

pub(crate) fn run(args: ProxyArgs) -> Result<()> {
    crate::init_logging("info");
    if !args.listen.ip().is_loopback() {
        tracing::warn!(listen = %args.listen, "the proxy serves plaintext: anyone who can reach this address can read and send your conversations");
    }
    ee_api::check_origins(&args.cors_allowed_origins).map_err(anyhow::Error::msg)?;
    let timeouts = Timeouts {
        first_byte: std::time::Duration::from_secs(args.first_byte_timeout_secs),
        between_events: std::time::Duration::from_secs(args.event_timeout_secs),
    };
    let mut session = session(
        &args.bundle,
        args.chat_format,
        &args.server,
        args.api_key,
        timeouts,
    )?;
    session.served_model_names = args.served_model_names;
    session.default_max_tokens = (args.default_max_tokens > 0).then_some(args.default_max_tokens);
    let session = Arc::new(session);
    tokio::runtime::Runtime::new()?.block_on(async move {
        check_server(&session).await?;
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(server = session.upstream.base_url(), "proxy listening on http://{addr} (OpenAI base_url http://{addr}/v1, chat page http://{addr}/)");
        let limits = ee_api::serve::ConnectionLimits::from_secs(
            args.header_read_timeout_secs,
            "--header-read-timeout-secs",
        )
        .map_err(anyhow::Error::msg)?;
        serve(
            listener,
            session,
            &args.cors_allowed_origins,
            limits,
            ee_api::shutdown_signal(),
        )
        .await
    })
}
