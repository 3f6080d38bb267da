//! `ee bench-server`: load on a running server, ours or llama.cpp's
//! `llama-server` (both take token-ID prompts on `/v1/completions`, and
//! both stream). A benchmark, not a test.
//!
//! For each concurrency level, that many streams each send `--rounds`
//! requests for fixed-length answers (`ignore_eos`), one after another.
//! With `--long-prompts`, that many long prompts arrive as well, while the
//! streams run: the load mix, in which long prefills must not starve the
//! running answers. It prints aggregate tokens/s, time to first token
//! (TTFT) and the gaps between a stream's tokens (inter-token latency,
//! ITL), as p50/p99/max over all requests. Every request's prompt is
//! different, so no server answers from a prompt cache.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

#[derive(Args)]
pub(crate) struct BenchServerArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    server: String,
    /// Concurrency levels to measure: streams of short chats.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    concurrency: Vec<usize>,
    /// Tokens per answer of the short chats.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Prompt length of the short chats, in tokens.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Requests each stream sends, one after another.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Long prompts sent, all at once, half a second into each level.
    #[arg(long, default_value_t = 0)]
    long_prompts: usize,
    /// Length of each long prompt, in tokens.
    #[arg(long, default_value_t = 2048)]
    long_prompt_tokens: usize,
    /// Tokens per answer to a long prompt.
    #[arg(long, default_value_t = 16)]
    long_max_tokens: usize,
    /// Bearer key, if the server wants one.
    #[arg(long, env = "EE_API_KEY")]
    api_key: Option<String>,
}

/// What one streamed request took.
#[derive(Default)]
struct Timing {
    tokens: u64,
    /// From sending the request to its first token.
    first_token: Duration,
    /// Between consecutive token events.
    gaps: Vec<Duration>,
}

struct Client<'a> {
    http: reqwest::blocking::Client,
    args: &'a BenchServerArgs,
    vocab: u64,
}

impl Client<'_> {
    fn auth(&self, r: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.args.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// A prompt of `n` ordinary IDs, different for every `salt`. Any IDs do:
    /// speed does not depend on them.
    fn prompt(&self, n: usize, salt: u64) -> Vec<u64> {
        let span = self.vocab.saturating_sub(100).max(1);
        (0..n as u64)
            .map(|i| 100 + (i * 7919 + salt * 104_729) % span)
            .collect()
    }

    /// Streams one completion and times its token events.
    fn stream(&self, prompt: Vec<u64>, max_tokens: usize) -> Result<Timing> {
        let body = json!({
            "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
            "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true},
        });
        let sent = Instant::now();
        let url = format!("{}/v1/completions", self.args.server);
        let r = self.auth(self.http.post(url)).json(&body).send()?;
        if !r.status().is_success() {
            bail!(
                "server answered {}: {}",
                r.status(),
                r.text().unwrap_or_default()
            );
        }
        let mut timing = Timing::default();
        let (mut last, mut counted) = (None, None);
        for line in BufReader::new(r).lines() {
            let line = line?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let v: Value = serde_json::from_str(data).context("a streamed event")?;
            // The count, where the server gives it: llama-server holds back
            // or merges tokens that end inside a UTF-8 character.
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                counted = Some(n);
            }
            let choice = &v["choices"][0];
            // Ours sends token IDs; llama-server sends text.
            let n = match choice["token_ids"].as_array() {
                Some(ids) => ids.len() as u64,
                None => choice["text"].as_str().is_some_and(|t| !t.is_empty()) as u64,
            };
            if n == 0 {
                continue;
            }
            let now = Instant::now();
            match last {
                None => timing.first_token = now - sent,
                Some(t) => timing.gaps.push(now - t),
            }
            last = Some(now);
            timing.tokens += n;
        }
        timing.tokens = counted.unwrap_or(timing.tokens);
        Ok(timing)
    }
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("a stream panicked"))?
}

/// The value at quantile `q` of `v` (sorted here), in milliseconds, or
/// `-` when there is none.
fn quantile_ms(v: &mut [Duration], q: f64) -> String {
    v.sort();
    match v.len() {
        0 => "-".into(),
        n => {
            let ms = v[((n - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
            format!("{ms:.0}ms")
        }
    }
}

fn vocab_size(models: &Value) -> Option<u64> {
    // Ours lists vocab_size; llama-server, meta.n_vocab.
    let card = &models["data"][0];
    card["vocab_size"]
        .as_u64()
        .or_else(|| card["meta"]["n_vocab"].as_u64())
}

pub(crate) fn run(args: BenchServerArgs) -> Result<()> {
    let mut client = Client {
        // A connection per request: llama-server closes kept-alive ones
        // after a few requests, which would race with reuse.
        http: reqwest::blocking::Client::builder()
            .timeout(None)
            .pool_max_idle_per_host(0)
            .build()?,
        args: &args,
        vocab: 0,
    };
    let models: Value = client
        .auth(client.http.get(format!("{}/v1/models", args.server)))
        .send()
        .context("reaching the server")?
        .json()?;
    client.vocab = vocab_size(&models).context("no vocabulary size in /v1/models")?;
    println!(
        "server: {}  short chats: prompt {} tokens, answers of {}, {} rounds",
        args.server, args.prompt_tokens, args.max_tokens, args.rounds
    );
    if args.long_prompts > 0 {
        println!(
            "load mix: {} long prompts of {} tokens (answers of {}) arrive 0.5 s into each level",
            args.long_prompts, args.long_prompt_tokens, args.long_max_tokens
        );
    }
    println!(
        "{:>6}{:>11}{:>11}{:>11}{:>10}{:>10}{:>10}{:>13}{:>13}",
        "conc",
        "tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "ITL max",
        "long TTFT50",
        "long TTFT99"
    );
    let mut salt = 0u64;
    for &c in &args.concurrency {
        let started = Instant::now();
        let (short, long) = std::thread::scope(|scope| {
            let short: Vec<_> = (0..c.max(1) as u64)
                .map(|s| {
                    let client = &client;
                    let salt = salt + s * args.rounds as u64;
                    scope.spawn(move || -> Result<Vec<Timing>> {
                        (0..args.rounds.max(1) as u64)
                            .map(|r| {
                                let prompt = client.prompt(args.prompt_tokens, salt + r);
                                client.stream(prompt, args.max_tokens)
                            })
                            .collect()
                    })
                })
                .collect();
            let long: Vec<_> = (0..args.long_prompts as u64)
                .map(|l| {
                    let client = &client;
                    let salt = salt + 1_000_000 + l;
                    scope.spawn(move || -> Result<Timing> {
                        std::thread::sleep(Duration::from_millis(500));
                        let prompt = client.prompt(args.long_prompt_tokens, salt);
                        client.stream(prompt, args.long_max_tokens)
                    })
                })
                .collect();
            let short: Result<Vec<Vec<Timing>>> = short.into_iter().map(join).collect();
            let long: Result<Vec<Timing>> = long.into_iter().map(join).collect();
            (short, long)
        });
        salt += 10_000_000;
        let (short, long): (Vec<Timing>, Vec<Timing>) =
            (short?.into_iter().flatten().collect(), long?);
        let total: u64 = short.iter().chain(&long).map(|t| t.tokens).sum();
        let rate = total as f64 / started.elapsed().as_secs_f64();
        let mut ttft: Vec<Duration> = short.iter().map(|t| t.first_token).collect();
        let mut gaps: Vec<Duration> = short.iter().flat_map(|t| t.gaps.clone()).collect();
        let mut long_ttft: Vec<Duration> = long.iter().map(|t| t.first_token).collect();
        println!(
            "{c:>6}{rate:>11.1}{:>11}{:>11}{:>10}{:>10}{:>10}{:>13}{:>13}",
            quantile_ms(&mut ttft, 0.5),
            quantile_ms(&mut ttft, 0.99),
            quantile_ms(&mut gaps, 0.5),
            quantile_ms(&mut gaps, 0.99),
            quantile_ms(&mut gaps, 1.0),
            quantile_ms(&mut long_ttft, 0.5),
            quantile_ms(&mut long_ttft, 0.99),
        );
    }
    Ok(())
}
