//! `ee bench`: prefill and decode tokens/s of the plaintext model and of its
//! EE-transformed twin on the same token stream, and their ratio; for an
//! encoder, embeddings/s (`bench_encoder.rs`). A benchmark, not a test: it
//! asserts nothing.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ee_core::transform::write_server_artifact;
use ee_core::Key;
use ee_engine::{CausalLm, KvCacheDtype, LoadOptions, Sampler, SamplingParams};

use crate::{check_default_model, default_model};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Plaintext model (a GGUF file or a Hugging Face checkpoint directory);
    /// an encrypted twin is made in a temp directory.
    #[arg(long, default_value_os_t = default_model())]
    model: PathBuf,
    /// Prompt length for the prefill measurement (llama-bench's pp).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated for the decode measurement (llama-bench's tg).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Repetitions; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The KV cache's element type: f16 (llama.cpp's default) or f32.
    #[arg(long, default_value_t = KvCacheDtype::F16)]
    kv_cache_dtype: KvCacheDtype,
    /// Encoders: tokens per input.
    #[arg(long, default_value_t = 32)]
    input_tokens: usize,
    /// Encoders: inputs per batch for the batched measurement.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

struct Speeds {
    prefill: Vec<f64>,
    decode: Vec<f64>,
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times one prefill of `prompt` and a greedy decode of `n` tokens.
fn measure(model: &dyn CausalLm, prompt: &[u32], n: usize) -> Result<(f64, f64)> {
    let mut cache = model.new_cache();
    let t = Instant::now();
    let mut row = model.forward_one(prompt, &mut cache)?;
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();

    let mut sampler = Sampler::new(SamplingParams::greedy(), prompt)?;
    let t = Instant::now();
    for _ in 0..n {
        let token = sampler.sample(&row, model.tie_keys(), None)?.token;
        row = model.forward_one(&[token], &mut cache)?;
    }
    Ok((prefill, n as f64 / t.elapsed().as_secs_f64()))
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    check_default_model(&args.model)?;
    if let Some(n) = args.threads {
        // Read by candle's thread pools on first use, which is below.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    if args.model.is_dir() && ee_engine::ModelFiles::open(&args.model)?.is_encoder() {
        return super::bench_encoder::run(&args.model, args.input_tokens, args.batch, args.reps);
    }
    let dir = tempfile::tempdir()?;
    let enc_path = match args.model.is_dir() {
        true => dir.path().join("encrypted"),
        false => dir.path().join("encrypted.gguf"),
    };
    let opts = LoadOptions {
        kv_cache_dtype: args.kv_cache_dtype,
        ..Default::default()
    };
    let plain = ee_engine::load_with(&args.model, &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let perm = Key::generate()?.vocab_permutation(plain.vocab_size() as u32);
    let t = Instant::now();
    write_server_artifact(&args.model, &enc_path, &perm, &mut |_, _| {})?;
    let transform_secs = t.elapsed().as_secs_f64();
    let enc = ee_engine::load_with(&enc_path, &opts)?;

    let needed = args.prompt_tokens.max(1) + args.gen_tokens;
    if needed > plain.context_length() {
        anyhow::bail!(
            "prompt + generated tokens ({needed}) exceed the context ({})",
            plain.context_length()
        );
    }
    // Ordinary (non-control) tokens, spread over the vocabulary.
    let vocab = plain.vocab_size() as u64;
    let prompt: Vec<u32> = (0..args.prompt_tokens.max(1) as u64)
        .map(|i| (100 + i * 7919 % (vocab - 100)) as u32)
        .collect();
    let enc_prompt = perm.encrypt_all(&prompt)?;

    // Warm-up (page in weights, size thread pools), not counted.
    measure(plain.as_ref(), &prompt[..prompt.len().min(16)], 4)?;
    measure(enc.as_ref(), &enc_prompt[..prompt.len().min(16)], 4)?;
    let mut plain_speeds = Speeds {
        prefill: vec![],
        decode: vec![],
    };
    let mut enc_speeds = Speeds {
        prefill: vec![],
        decode: vec![],
    };
    for rep in 0..args.reps.max(1) {
        // Interleaved, and alternating which goes first, so drift in the
        // machine's speed hits both alike.
        let mut runs = [
            (&plain, &prompt, &mut plain_speeds),
            (&enc, &enc_prompt, &mut enc_speeds),
        ];
        if rep % 2 == 1 {
            runs.reverse();
        }
        for (model, tokens, speeds) in runs {
            let (p, d) = measure(model.as_ref(), tokens, args.gen_tokens)?;
            speeds.prefill.push(p);
            speeds.decode.push(d);
        }
    }
    let (pp, pd) = (
        median(&mut plain_speeds.prefill),
        median(&mut plain_speeds.decode),
    );
    let (ep, ed) = (
        median(&mut enc_speeds.prefill),
        median(&mut enc_speeds.decode),
    );
    println!(
        "model: {} ({}, weights {})",
        args.model.display(),
        plain.architecture(),
        plain.weight_types()
    );
    println!(
        "threads: {}  cpu: {}  transform: {transform_secs:.2}s",
        candle_core::utils::get_num_threads(),
        cpu_features()
    );
    println!(
        "prompt {} tokens, {} generated, median of {} runs",
        prompt.len(),
        args.gen_tokens,
        args.reps.max(1)
    );
    println!("{:<18}{:>16}{:>16}", "", "prefill tok/s", "decode tok/s");
    println!("{:<18}{pp:>16.1}{pd:>16.1}", "plaintext");
    println!("{:<18}{ep:>16.1}{ed:>16.1}", "encrypted");
    println!(
        "{:<18}{:>16.3}{:>16.3}",
        "ratio enc/plain",
        ep / pp,
        ed / pd
    );
    println!(
        "kv cache: {}, {} bytes per token",
        args.kv_cache_dtype,
        plain.kv_bytes_per_token()
    );
    println!(
        "peak RSS: {} (this process: both models and their caches)",
        peak_rss()
    );
    Ok(())
}

/// The process's peak resident memory (Linux's VmHWM), or why not.
fn peak_rss() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map_or("unknown (no /proc/self/status)".into(), |kb| {
            format!("{} MiB", kb.div_ceil(1024))
        })
}

pub(crate) fn cpu_features() -> String {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        // With AVX-512 VL, the engine's kernels use it (see ee_engine::quant).
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            f.push("avx512vnni");
        }
    }
    if f.is_empty() {
        "generic".into()
    } else {
        f.join(",")
    }
}
