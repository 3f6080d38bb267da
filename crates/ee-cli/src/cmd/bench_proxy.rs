//! `ee bench-proxy`: what the proxy adds to a request. A stub blind server
//! answers instantly with a fixed encrypted answer; the same chat is timed
//! straight to the stub (already encrypted) and through the proxy
//! (plaintext: template, tokenize, encrypt, decrypt, detokenize). The
//! difference of the medians is the proxy's overhead. A benchmark, not a test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use ee_client::keyholder::KeyHolder;
use ee_client::template::{ChatFormat, ChatMessage};
use serde_json::{json, Value};

#[derive(Args)]
pub(crate) struct BenchProxyArgs {
    /// A client bundle (for example ee-demo/bundle after `ee demo`).
    #[arg(long)]
    bundle: PathBuf,
    /// Timed requests per path (after as many warm-up requests).
    #[arg(long, default_value_t = 300)]
    requests: usize,
}

const QUESTION: &str = "What is the capital of France?";
const ANSWER: &str = "The capital of France is Paris.";

/// The stub's SSE body: one chunk per encrypted token, a finish, [DONE].
fn stub_stream(answer: &[u32]) -> String {
    let chunk = |ids: &[u32], finish: Option<&str>| {
        let c = json!({"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "ee-model",
            "choices": [{"index": 0, "delta": {"content": null, "token_ids": ids}, "logprobs": null, "finish_reason": finish}],
            "usage": null});
        format!("data: {c}\n\n")
    };
    let mut body: String = answer.iter().map(|id| chunk(&[*id], None)).collect();
    body.push_str(&chunk(&[], Some("stop")));
    body.push_str("data: [DONE]\n\n");
    body
}

fn median_and_p90(mut times: Vec<Duration>) -> (Duration, Duration) {
    times.sort();
    (times[times.len() / 2], times[times.len() * 9 / 10])
}

fn time_requests(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &Value,
    n: usize,
) -> Result<Vec<Duration>> {
    let mut times = Vec::with_capacity(n);
    for i in 0..2 * n {
        let started = Instant::now();
        let r = client.post(url).json(body).send()?;
        if !r.status().is_success() {
            bail!(
                "{url} answered {}: {}",
                r.status(),
                r.text().unwrap_or_default()
            );
        }
        r.bytes()?;
        if i >= n {
            times.push(started.elapsed());
        }
    }
    Ok(times)
}

pub(crate) fn run(args: BenchProxyArgs) -> Result<()> {
    let keys = KeyHolder::load(&args.bundle, ChatFormat::LlamaCpp)
        .with_context(|| format!("loading {}", args.bundle.display()))?;
    let mut answer = keys.codec().encode(ANSWER)?;
    answer.extend(keys.stop_ids().first());
    let stub_body = Arc::new(stub_stream(&keys.encrypt(&answer)?));
    let prompt = keys.encrypt(&keys.chat_prompt(&[ChatMessage::new("user", QUESTION)])?)?;
    let manifest = keys.bundle().manifest.clone();

    let runtime = tokio::runtime::Runtime::new()?;
    let (stub_addr, proxy_addr): (SocketAddr, SocketAddr) = runtime.block_on(async {
        let card = json!({"object": "list", "data": [{"id": "ee-model", "object": "model", "created": 0,
            "owned_by": "ee", "artifact_sha256": manifest.server_artifact.sha256,
            "vocab_size": manifest.vocab_size, "context_length": 8192}]});
        let sse = stub_body.clone();
        let sha = manifest.server_artifact.sha256.clone();
        let card_sha = sha.clone();
        let stub = Router::new()
            .route(
                "/v1/models",
                get(move || async move { ([(ee_api::ARTIFACT_HEADER, card_sha)], Json(card)) }),
            )
            .route(
                "/v1/chat/completions",
                post(move || {
                    let (sse, sha) = (sse.clone(), sha.clone());
                    async move {
                        let headers = [("content-type", "text/event-stream".to_owned()), (ee_api::ARTIFACT_HEADER, sha)];
                        (headers, sse.to_string()).into_response()
                    }
                }),
            );
        let stub_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let stub_addr = stub_listener.local_addr()?;
        tokio::spawn(async move { axum::serve(stub_listener, stub).await });
        let session = super::proxy::session(
            &args.bundle,
            ChatFormat::LlamaCpp,
            &format!("http://{stub_addr}"),
            None,
            Default::default(),
        )?;
        let proxy_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = proxy_listener.local_addr()?;
        tokio::spawn(async move {
            super::proxy::serve(
                proxy_listener,
                std::sync::Arc::new(session),
                &[],
                ee_api::serve::ConnectionLimits::default(),
                std::future::pending(),
            ).await
        });
        Ok::<_, anyhow::Error>((stub_addr, proxy_addr))
    })?;

    let client = reqwest::blocking::Client::new();
    let direct = json!({"messages": [{"role": "user", "content": [{"type": "token_ids", "token_ids": prompt}]}],
        "max_tokens": 64, "temperature": 0, "stream": true});
    let through = json!({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 64, "temperature": 0});
    let direct_times = time_requests(
        &client,
        &format!("http://{stub_addr}/v1/chat/completions"),
        &direct,
        args.requests,
    )?;
    let proxy_times = time_requests(
        &client,
        &format!("http://{proxy_addr}/v1/chat/completions"),
        &through,
        args.requests,
    )?;
    let (d50, d90) = median_and_p90(direct_times);
    let (p50, p90) = median_and_p90(proxy_times);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "chat request, {}-token prompt, {}-token answer, {} timed requests each",
        prompt.len(),
        answer.len(),
        args.requests
    );
    println!("{:>22}{:>12}{:>12}", "", "median µs", "p90 µs");
    println!(
        "{:>22}{:>12.0}{:>12.0}",
        "straight to the server",
        us(d50),
        us(d90)
    );
    println!(
        "{:>22}{:>12.0}{:>12.0}",
        "through the proxy",
        us(p50),
        us(p90)
    );
    println!("proxy overhead at the median: {:.0} µs", us(p50) - us(d50));
    Ok(())
}
