//! Adversary 2: the server operator facing *private* weights, a fine-tune of
//! a public base model it has never seen. The artifact's rows are no longer
//! the base's rows, only near them; the attack matches each artifact row to
//! its nearest base row (cosine similarity, over the embedding and the
//! untied output head). This is where EE should help, so the lab measures by
//! how much.
//!
//! The fine-tune is simulated on the base's (dequantized) values, in one of
//! two ways, each scaled by δ relative to the matrix:
//! - [`Perturbation::Noise`]: i.i.d. Gaussian noise of RMS δ·rms(W);
//! - [`Perturbation::LowRank`]: a random rank-r update `U·V` with
//!   ‖U·V‖_F = δ·‖W‖_F, the shape of a LoRA on these matrices. (A LoRA
//!   usually leaves the embedding and head untouched; then this attack's
//!   δ is 0 and [`crate::weight_match::exact`] applies.)

use candle_core::{DType, Device, Tensor, D};
use ee_core::Permutation;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use crate::rows::{RowMatrix, VocabRows};
use crate::{Error, RecoveredMap};

/// How the simulated fine-tune moves the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perturbation {
    /// I.i.d. Gaussian noise on every weight.
    Noise,
    /// A random update `U·V` of this rank (at least 1).
    LowRank(usize),
}

impl std::fmt::Display for Perturbation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Perturbation::Noise => write!(f, "noise"),
            Perturbation::LowRank(r) => write!(f, "rank-{r} update"),
        }
    }
}

/// A standard normal sample (Box–Muller).
fn normal(rng: &mut ChaCha20Rng) -> f32 {
    let u = |rng: &mut ChaCha20Rng| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (a, b) = (u(rng), u(rng));
    ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// `m` moved by `delta` in the way `kind` says (deterministic in `seed`).
pub fn fine_tune(m: &RowMatrix, delta: f32, kind: Perturbation, seed: u64) -> RowMatrix {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (rows, dim) = (m.rows(), m.dim);
    let update: Vec<f32> = match kind {
        Perturbation::Noise => (0..rows * dim).map(|_| normal(&mut rng)).collect(),
        Perturbation::LowRank(r) => {
            let u: Vec<f32> = (0..rows * r).map(|_| normal(&mut rng)).collect();
            let v: Vec<f32> = (0..r * dim).map(|_| normal(&mut rng)).collect();
            (0..rows * dim)
                .map(|i| {
                    let (row, col) = (i / dim, i % dim);
                    (0..r).map(|k| u[row * r + k] * v[k * dim + col]).sum()
                })
                .collect()
        }
    };
    let update_norm = norm(&update);
    if update_norm == 0.0 {
        // A rank-0 update moves nothing.
        return m.clone();
    }
    let scale = (f64::from(delta) * norm(&m.values) / update_norm) as f32;
    let values = m
        .values
        .iter()
        .zip(&update)
        .map(|(&w, &d)| w + scale * d)
        .collect();
    RowMatrix::from_values(values, dim)
}

/// What the operator holds for a private fine-tune of `base` encrypted with
/// `key`: the fine-tuned rows, each moved to its encrypted position.
///
/// # Panics
/// `key` is smaller than the vocabulary.
pub fn private_artifact(
    base: &VocabRows,
    key: &Permutation,
    delta: f32,
    kind: Perturbation,
    seed: u64,
) -> VocabRows {
    let permuted = |m: &RowMatrix, seed: u64| {
        let tuned = fine_tune(m, delta, kind, seed);
        let mut values = vec![0f32; tuned.values.len()];
        for t in 0..tuned.rows() {
            let c = key.encrypt(t as u32).expect("key sized to the vocabulary") as usize;
            values[c * m.dim..(c + 1) * m.dim].copy_from_slice(tuned.row(t));
        }
        RowMatrix::from_values(values, m.dim)
    };
    VocabRows {
        embedding: permuted(&base.embedding, seed),
        head: base.head.as_ref().map(|h| permuted(h, seed ^ 0x9e37_79b9)),
    }
}

/// Rows of `rows` (embedding, then head) as unit vectors, `[vocab, width]`.
fn unit_rows(rows: &VocabRows) -> Result<Tensor, Error> {
    let n = rows.vocab_size();
    let mut parts = vec![Tensor::from_slice(
        &rows.embedding.values,
        (n, rows.embedding.dim),
        &Device::Cpu,
    )?];
    if let Some(h) = &rows.head {
        parts.push(Tensor::from_slice(&h.values, (n, h.dim), &Device::Cpu)?);
    }
    let m = Tensor::cat(&parts, 1)?;
    let norms = m.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
    Ok(m.broadcast_div(&norms)?)
}

/// Maps each artifact row to its most similar base row.
///
/// # Errors
/// The two models' rows differ in shape.
pub fn nearest(base: &VocabRows, artifact: &VocabRows) -> Result<RecoveredMap, Error> {
    let b = unit_rows(base)?;
    let a = unit_rows(artifact)?;
    if b.dims()[1] != a.dims()[1] {
        return Err(Error::Model(format!(
            "rows of width {} cannot be matched to rows of width {}",
            a.dims()[1],
            b.dims()[1]
        )));
    }
    let bt = b.t()?.contiguous()?;
    let n = artifact.vocab_size();
    let mut out = Vec::with_capacity(n);
    // A block of artifact rows against all base rows at a time, so memory
    // stays at block × vocabulary similarities.
    const BLOCK: usize = 512;
    for start in (0..n).step_by(BLOCK) {
        let len = BLOCK.min(n - start);
        let sims = a.narrow(0, start, len)?.matmul(&bt)?;
        let best = sims
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        out.extend(best.into_iter().map(Some));
    }
    Ok(RecoveredMap(out))
}

/// Against a hidden-channel key on private weights: recovers the channel
/// permutation from the vocabulary rows alone. A column of the embedding
/// holds one channel's value for every token; the vocabulary permutation
/// reorders it and the fine-tune nudges it, but its *sorted* values barely
/// move, so each artifact column is matched to the base column whose
/// sorted values are most similar (cosine, centred). Returns, for each
/// artifact channel, the base channel it is taken to be.
///
/// # Errors
/// The two matrices differ in shape.
pub fn recover_channels(base: &RowMatrix, artifact: &RowMatrix) -> Result<Vec<usize>, Error> {
    if (base.rows(), base.dim) != (artifact.rows(), artifact.dim) {
        return Err(Error::Model(format!(
            "a {}×{} artifact against a {}×{} base",
            artifact.rows(),
            artifact.dim,
            base.rows(),
            base.dim
        )));
    }
    let sorted_columns = |m: &RowMatrix| -> Result<Tensor, Error> {
        let (rows, dim) = (m.rows(), m.dim);
        let mut out = Vec::with_capacity(rows * dim);
        for c in 0..dim {
            let mut col: Vec<f32> = (0..rows).map(|r| m.values[r * dim + c]).collect();
            col.sort_by(f32::total_cmp);
            let mean = col.iter().map(|&x| f64::from(x)).sum::<f64>() / rows.max(1) as f64;
            col.iter_mut().for_each(|x| *x -= mean as f32);
            let n = norm(&col).max(1e-12) as f32;
            col.iter_mut().for_each(|x| *x /= n);
            out.extend(col);
        }
        Ok(Tensor::from_vec(out, (dim, rows), &Device::Cpu)?)
    };
    let (b, a) = (sorted_columns(base)?, sorted_columns(artifact)?);
    let sims = a.matmul(&b.t()?.contiguous()?)?;
    let best = sims
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .to_vec1::<u32>()?;
    Ok(best.into_iter().map(|c| c as usize).collect())
}

/// `artifact` with its channels put back in the base's order, by a
/// recovered channel map (artifact channel → base channel; where two
/// artifact channels claim one base channel, the first keeps it and
/// unclaimed base channels take the rest in order).
pub fn unpermute_channels(artifact: &VocabRows, recovered: &[usize]) -> VocabRows {
    let dim = recovered.len();
    let mut source: Vec<Option<usize>> = vec![None; dim];
    let mut spare = Vec::new();
    for (i, &j) in recovered.iter().enumerate() {
        match source.get_mut(j) {
            Some(slot @ None) => *slot = Some(i),
            _ => spare.push(i),
        }
    }
    let mut spare = spare.into_iter();
    let sigma: Vec<usize> = source
        .into_iter()
        .map(|s| s.or_else(|| spare.next()).unwrap_or(0))
        .collect();
    artifact.with_channels_permuted(&sigma)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Score;

    fn base(n: usize, dim: usize) -> VocabRows {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        VocabRows {
            embedding: RowMatrix::from_values(
                (0..n * dim).map(|_| normal(&mut rng)).collect(),
                dim,
            ),
            head: None,
        }
    }

    #[test]
    fn fine_tunes_move_the_weights_by_delta() {
        let b = base(300, 32);
        for kind in [Perturbation::Noise, Perturbation::LowRank(4)] {
            let t = fine_tune(&b.embedding, 0.05, kind, 1);
            let diff: Vec<f32> = t
                .values
                .iter()
                .zip(&b.embedding.values)
                .map(|(x, y)| x - y)
                .collect();
            let rel = norm(&diff) / norm(&b.embedding.values);
            assert!((rel - 0.05).abs() < 1e-4, "{kind}: {rel}");
        }
    }

    #[test]
    fn hidden_channels_of_a_lightly_tuned_model_are_recovered_from_sorted_columns() {
        let b = base(2000, 16);
        let key = ee_core::Key::from_bytes([9; 32]).vocab_permutation(2000);
        let tuned = private_artifact(&b, &key, 0.01, Perturbation::Noise, 5);
        let sigma: Vec<usize> = (0..16).map(|i| (i * 7 + 3) % 16).collect();
        let hidden = tuned.with_channels_permuted(&sigma);
        let got = recover_channels(&b.embedding, &hidden.embedding).unwrap();
        assert_eq!(got, sigma);
        let back = unpermute_channels(&hidden, &got);
        let s = Score::of(&nearest(&b, &back).unwrap(), &key, &[]);
        assert!(s.vocab_recovered() > 0.99, "{}", s.vocab_recovered());
    }

    #[test]
    fn nearest_rows_recover_a_lightly_tuned_model_and_not_a_heavily_tuned_one() {
        let b = base(300, 32);
        let key = ee_core::Key::from_bytes([9; 32]).vocab_permutation(300);
        let light = private_artifact(&b, &key, 0.01, Perturbation::Noise, 5);
        let s = Score::of(&nearest(&b, &light).unwrap(), &key, &[]);
        assert_eq!(s.vocab_correct, 300);
        // Noise as large as the weights: far fewer rows find their own.
        let heavy = private_artifact(&b, &key, 3.0, Perturbation::Noise, 5);
        let s = Score::of(&nearest(&b, &heavy).unwrap(), &key, &[]);
        assert!(s.vocab_correct < 250, "{}", s.vocab_correct);
    }
}
