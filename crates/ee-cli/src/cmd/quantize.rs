//! `ee quantize`: llama.cpp's `llama-quantize` for our formats, so a user
//! can quantize their own fine-tune (as a GGUF, F16, BF16 or otherwise) before
//! encrypting it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ee_engine::quantize::{quantize_gguf, FileType};

#[derive(Args)]
pub(crate) struct QuantizeArgs {
    /// The GGUF to read: F32, F16, BF16 or any quantization our engine
    /// loads. It may also be `--out`.
    #[arg(long)]
    model: PathBuf,
    /// Where to write the quantized GGUF.
    #[arg(long)]
    out: PathBuf,
    /// F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_M, Q5_K_M or Q6_K.
    #[arg(long = "type")]
    file_type: FileType,
}

pub(crate) fn run(args: QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    let changes = quantize_gguf(&args.model, &args.out, args.file_type)
        .with_context(|| format!("quantizing {}", args.model.display()))?;
    let float = ["F32", "F16", "BF16"];
    let requantized: BTreeMap<&str, usize> = changes
        .iter()
        .filter(|c| c.from != c.to && !float.contains(&c.from.as_str()))
        .fold(BTreeMap::new(), |mut n, c| {
            *n.entry(c.from.as_str()).or_default() += 1;
            n
        });
    if !requantized.is_empty() {
        let list: Vec<String> = requantized
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        eprintln!(
            "note: {} tensors were already quantized ({}) and were requantized: \
             they keep their first quantization's error; quantize from F16 where you can",
            requantized.values().sum::<usize>(),
            list.join(", ")
        );
    }
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &changes {
        *by_type.entry(&c.to).or_default() += 1;
    }
    let summary: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
    let bytes = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len() as f64 / 1048576.0);
    println!(
        "wrote {} ({}, {:.1} MiB from {:.1} MiB) in {:.1} s: {} tensors ({})",
        args.out.display(),
        args.file_type.name(),
        bytes(&args.out)?,
        bytes(&args.model)?,
        start.elapsed().as_secs_f64(),
        changes.len(),
        summary.join(", ")
    );
    Ok(())
}
