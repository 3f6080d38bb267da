//! `ee bench` on an encoder (BERT-family checkpoint): embeddings per second
//! of the plaintext model and of its EE-transformed twin on the same
//! inputs, at batch 1 and at a larger batch, and their ratio. A benchmark,
//! not a test: it asserts nothing.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use ee_core::transform::write_encoder_server_artifact;
use ee_core::Key;
use ee_engine::{Encoder, ModelFiles};

use super::bench::{cpu_features, median};

/// Embeddings per second of `model` on `inputs`, `batch` at a time.
fn measure(model: &dyn Encoder, inputs: &[Vec<u32>], batch: usize) -> Result<f64> {
    let t = Instant::now();
    for chunk in inputs.chunks(batch.max(1)) {
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        model.embed(&refs)?;
    }
    Ok(inputs.len() as f64 / t.elapsed().as_secs_f64())
}

/// Times the encoder at `model` with inputs of `input_tokens` tokens, at
/// batch 1 and at `batch`, plaintext and encrypted, interleaved.
pub(crate) fn run(model_path: &Path, input_tokens: usize, batch: usize, reps: usize) -> Result<()> {
    let plain = ModelFiles::open(model_path)?
        .load_encoder()
        .with_context(|| format!("loading {}", model_path.display()))?;
    let dir = tempfile::tempdir()?;
    let enc_path = dir.path().join("encrypted");
    let key = Key::generate()?;
    let t = Instant::now();
    write_encoder_server_artifact(model_path, &enc_path, &key, &mut |_, _| {})?;
    let transform_secs = t.elapsed().as_secs_f64();
    let enc = ModelFiles::open(&enc_path)?.load_encoder()?;
    let len = input_tokens.clamp(1, plain.max_positions());
    let vocab = plain.vocab_size() as u64;
    // Distinct inputs of ordinary tokens spread over the vocabulary, past
    // the special and unused ones a WordPiece vocabulary starts with.
    let skip = (vocab / 30).min(1000);
    let inputs: Vec<Vec<u32>> = (0..batch.max(1) as u64)
        .map(|s| {
            (0..len as u64)
                .map(|i| (skip + (s * 131 + i) * 7919 % (vocab - skip).max(1)) as u32)
                .collect()
        })
        .collect();
    let perm = key.vocab_permutation(vocab as u32);
    let enc_inputs: Vec<Vec<u32>> = inputs
        .iter()
        .map(|ids| perm.encrypt_all(ids))
        .collect::<Result<_, _>>()?;
    measure(plain.as_ref(), &inputs[..1], 1)?;
    measure(enc.as_ref(), &enc_inputs[..1], 1)?;
    // [plaintext, encrypted] × [batch 1, batch n].
    let mut speeds = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
    for rep in 0..reps.max(1) {
        let mut order = [0usize, 1];
        if rep % 2 == 1 {
            order.reverse();
        }
        for which in order {
            let (model, ins) = match which {
                0 => (plain.as_ref(), &inputs),
                _ => (enc.as_ref(), &enc_inputs),
            };
            speeds[which][0].push(measure(model, ins, 1)?);
            speeds[which][1].push(measure(model, ins, batch)?);
        }
    }
    let [[p1, pn], [e1, en]] = speeds.map(|s| s.map(|mut v| median(&mut v)));
    println!(
        "model: {} ({}, {} wide, pooling {:?})",
        model_path.display(),
        plain.architecture(),
        plain.hidden_size(),
        plain.pooling()
    );
    println!(
        "threads: {}  cpu: {}  transform: {transform_secs:.2}s",
        candle_core::utils::get_num_threads(),
        cpu_features()
    );
    println!(
        "inputs of {len} tokens, {} per run, median of {} runs",
        inputs.len(),
        reps.max(1)
    );
    let wide = format!("batch {batch} emb/s");
    println!("{:<18}{:>16}{:>18}", "", "batch 1 emb/s", wide);
    println!("{:<18}{p1:>16.1}{pn:>18.1}", "plaintext");
    println!("{:<18}{e1:>16.1}{en:>18.1}", "encrypted");
    println!(
        "{:<18}{:>16.3}{:>18.3}",
        "ratio enc/plain",
        e1 / p1,
        en / pn
    );
    Ok(())
}
