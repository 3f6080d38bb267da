//! `ee bench-server`: load on a running blind server. N concurrent streams
//! each ask for fixed-length answers (`ignore_eos`); it prints aggregate and
//! per-stream tokens/s for each concurrency, and the scaling over one stream.
//! A benchmark, not a test.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args)]
pub(crate) struct BenchServerArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    server: String,
    /// Concurrency levels to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
    /// Tokens per answer.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Requests each stream sends, one after another.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Bearer key, if the server wants one.
    #[arg(long, env = "EE_API_KEY")]
    api_key: Option<String>,
}

pub(crate) fn run(args: BenchServerArgs) -> Result<()> {
    let client = reqwest::blocking::Client::builder().timeout(None).build()?;
    let auth = |r: reqwest::blocking::RequestBuilder| match &args.api_key {
        Some(k) => r.bearer_auth(k),
        None => r,
    };
    let models: Value = auth(client.get(format!("{}/v1/models", args.server)))
        .send()
        .context("reaching the server")?
        .json()?;
    let vocab = models["data"][0]["vocab_size"]
        .as_u64()
        .context("no vocab_size in /v1/models")?;
    // Any IDs do: the server cannot tell, and speed does not depend on them.
    let prompt: Vec<u64> = (0..args.prompt_tokens as u64)
        .map(|i| 100 + (i * 7919) % (vocab - 100))
        .collect();
    let body = json!({"prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": true, "temperature": 0});

    println!(
        "server: {}  answers of {} tokens, prompt {} tokens, {} rounds",
        args.server, args.max_tokens, args.prompt_tokens, args.rounds
    );
    println!(
        "{:>12}{:>16}{:>18}{:>12}",
        "concurrency", "total tok/s", "per-stream tok/s", "scaling"
    );
    let mut single = None;
    for &c in &args.concurrency {
        let started = Instant::now();
        let tokens: Result<Vec<u64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..c.max(1))
                .map(|_| {
                    scope.spawn(|| -> Result<u64> {
                        let mut n = 0;
                        for _ in 0..args.rounds.max(1) {
                            let r = auth(client.post(format!("{}/v1/completions", args.server)))
                                .json(&body)
                                .send()?;
                            if !r.status().is_success() {
                                bail!(
                                    "server answered {}: {}",
                                    r.status(),
                                    r.text().unwrap_or_default()
                                );
                            }
                            let v: Value = r.json()?;
                            n += v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                        }
                        Ok(n)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a stream panicked"))?)
                .collect()
        });
        let total: u64 = tokens?.iter().sum();
        let rate = total as f64 / started.elapsed().as_secs_f64();
        let base = *single.get_or_insert(rate);
        println!(
            "{c:>12}{rate:>16.1}{:>18.1}{:>11.2}x",
            rate / c.max(1) as f64,
            rate / base
        );
    }
    Ok(())
}
