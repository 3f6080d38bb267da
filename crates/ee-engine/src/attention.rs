//! Attention of new tokens over their sequence's KV cache, read in place:
//! one kernel for a prefill chunk and for a decode step.
//!
//! Flash-attention style (Dao et al., 2022): keys are visited in blocks of
//! [`KEY_BLOCK`] with an online softmax (a running maximum and sum per query
//! row, the partial output rescaled when the maximum grows), so the
//! `n × total` score matrix is never materialised and causal and
//! sliding-window masks skip whole blocks instead of adding `-inf`. Work is
//! parallel over heads and tiles of query rows.
//!
//! Keys are read transposed (a row of positions per dimension, as the KV
//! cache stores them), so the scores of a chunk of keys accumulate in
//! vector registers with no horizontal sums; values accumulate a chunk of
//! dimensions at a time, also in registers.
//!
//! Every query row is computed by the same operations in the same order,
//! whatever tile, chunk or batch it arrives in: block boundaries sit at
//! fixed absolute key positions, each score is a fused multiply-add over
//! the dimensions in order, and values are accumulated in key order. So,
//! given the same queries, keys and values, a token attends with the same
//! bits whether it is prefilled in one chunk or another, or decoded (the
//! weight matmuls keep that property for their rows; see `linear.rs`), and
//! the encrypted model (same path) stays bit-identical to the plaintext
//! one. The AVX2 build and the portable one give the same bits: `mul_add`
//! is a correctly rounded fused multiply-add in both (a slow libm call
//! where the CPU has no FMA).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::activation::exp;
use crate::kv_cache::{LayerView, KEY_CHUNK};
use crate::Error;

/// Keys per block of the online softmax, at fixed absolute positions.
const KEY_BLOCK: usize = 64;
// A block is whole chunks of keys.
const _: () = assert!(KEY_BLOCK.is_multiple_of(KEY_CHUNK));
/// Query rows per parallel task.
const QUERY_TILE: usize = 32;
/// Query rows sharing each key load.
const MICRO_ROWS: usize = 4;
/// Output dimensions accumulated together, in registers.
const DIM_CHUNK: usize = 16;

/// Attention of `n` new tokens at positions `pos..pos + n` over everything
/// cached for their sequence, themselves included. `q` is `[n_head, n, hd]`
/// and `cache` the layer's cache after the new tokens were appended
/// (`cache.total = pos + n`). Causal; only the last `sliding_window`
/// positions are attended to, when there is one. Returns
/// `[n, n_head * hd]`.
///
/// # Errors
/// Shapes that do not match the cache's heads, no new token, or a sliding
/// window of 0.
pub(crate) fn attention(
    q: &Tensor,
    cache: &LayerView<'_>,
    sliding_window: Option<usize>,
) -> Result<Tensor, Error> {
    let (n_head, n, hd) = q.dims3()?;
    check_shapes(n_head, n, hd, cache, sliding_window)?;
    let (n_kv, total) = (cache.n_kv_head, cache.total);
    let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let shape = Shape {
        head_dim: hd,
        group: n_head / n_kv,
        first_pos: total - n,
        sliding_window,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let per_head = cache.capacity * hd;
    // Output `[n_head, n, hd]`, one task per (head, tile of query rows).
    let mut out = vec![0f32; n_head * n * hd];
    out.par_chunks_mut(n * hd)
        .zip(q.par_chunks(n * hd))
        .enumerate()
        .for_each(|(h, (head_out, head_q))| {
            let kv = h / shape.group;
            let head = Head {
                keys: &cache.keys[kv * per_head..][..per_head],
                values: &cache.values[kv * per_head..][..per_head],
            };
            head_out
                .par_chunks_mut(QUERY_TILE * hd)
                .zip(head_q.par_chunks(QUERY_TILE * hd))
                .enumerate()
                .for_each(|(t, (tile_out, tile_q))| {
                    attend_tile(&shape, &head, t * QUERY_TILE, tile_q, tile_out)
                });
        });
    let out = Tensor::from_vec(out, (n_head, n, hd), &Device::Cpu)?;
    Ok(out.transpose(0, 1)?.reshape((n, n_head * hd))?)
}

/// [`attention`] as candle-transformers' Llama computes it: the whole
/// `[n_head, n, total]` score matrix with an additive causal (and
/// sliding-window) mask, candle's softmax, K/V repeated per q-head. Slow
/// and memory-hungry at long context; it exists so that the forward pass
/// can be compared with candle's reference model to the last rounding
/// ([`crate::LoadOptions::candle_kernels`]).
pub(crate) fn reference_attention(
    q: &Tensor,
    cache: &LayerView<'_>,
    sliding_window: Option<usize>,
) -> Result<Tensor, Error> {
    let (n_head, n, hd) = q.dims3()?;
    check_shapes(n_head, n, hd, cache, sliding_window)?;
    let (k, v) = (&cache.keys_tensor()?, &cache.values_tensor()?);
    let (n_kv_head, total, _) = k.dims3()?;
    let pos = total - n;
    let mut mask = vec![0f32; n * total];
    for (i, row) in mask.chunks_exact_mut(total).enumerate() {
        for (key_pos, m) in row.iter_mut().enumerate() {
            let query_pos = pos + i;
            let future = key_pos > query_pos;
            let too_old = sliding_window.is_some_and(|w| query_pos - key_pos.min(query_pos) >= w);
            if future || too_old {
                *m = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (n, total), q.device())?;
    let group = n_head / n_kv_head;
    let rep = |t: &Tensor| -> Result<Tensor, Error> {
        Ok(t.unsqueeze(1)?
            .expand((n_kv_head, group, total, hd))?
            .reshape((n_head, total, hd))?)
    };
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&rep(k)?.t()?)? * scale)?.broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&rep(v)?)?;
    Ok(out.transpose(0, 1)?.reshape((n, n_head * hd))?)
}

/// Refuses what the kernels cannot compute: no new token, a head size of
/// 0, heads that do not match the cache, or a window of 0 keys.
fn check_shapes(
    n_head: usize,
    n: usize,
    hd: usize,
    cache: &LayerView<'_>,
    sliding_window: Option<usize>,
) -> Result<(), Error> {
    let n_kv = cache.n_kv_head;
    if n == 0 || hd == 0 || cache.total < n || n_kv == 0 || !n_head.is_multiple_of(n_kv) {
        return Err(Error::Model("attention shapes do not match".into()));
    }
    if hd != cache.head_dim || sliding_window == Some(0) {
        return Err(Error::Model(
            "attention shapes do not match the cache".into(),
        ));
    }
    Ok(())
}

/// What every row of one call shares.
struct Shape {
    head_dim: usize,
    /// q-heads per kv-head (GQA).
    group: usize,
    /// Position of the first new token.
    first_pos: usize,
    sliding_window: Option<usize>,
    scale: f32,
}

/// One kv-head's cache, from position 0: key chunks `[chunk][hd][KEY_CHUNK]`
/// and values `[position][hd]`.
struct Head<'a> {
    keys: &'a [f32],
    values: &'a [f32],
}

impl Shape {
    /// The keys query row `i` (a new token) attends to.
    fn keys_of(&self, i: usize) -> std::ops::Range<usize> {
        let pos = self.first_pos + i;
        let start = self
            .sliding_window
            .map_or(0, |w| (pos + 1).saturating_sub(w));
        start..pos + 1
    }
}

/// Rows `first..first + q.len() / hd` of one head, as an AVX-512 or AVX2
/// build when the CPU has it: the same operations in the same order, so
/// the same bits.
fn attend_tile(shape: &Shape, head: &Head<'_>, first: usize, q: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU reports AVX-512F, AVX2 and FMA.
        return unsafe { attend_tile_avx512(shape, head, first, q, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { attend_tile_avx2(shape, head, first, q, out) };
    }
    attend_tile_portable(shape, head, first, q, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_tile_avx2(
    shape: &Shape,
    head: &Head<'_>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    attend_tile_portable(shape, head, first, q, out)
}

/// The same again with 512-bit vectors: a key chunk's 32 scores are two
/// registers, not four.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_tile_avx512(
    shape: &Shape,
    head: &Head<'_>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    attend_tile_portable(shape, head, first, q, out)
}

#[inline(always)]
fn attend_tile_portable(shape: &Shape, head: &Head<'_>, first: usize, q: &[f32], out: &mut [f32]) {
    let hd = shape.head_dim;
    let rows = q.len() / hd;
    let mut r = 0;
    while r + MICRO_ROWS <= rows {
        attend_rows::<MICRO_ROWS>(shape, head, first + r, &q[r * hd..], &mut out[r * hd..]);
        r += MICRO_ROWS;
    }
    while r < rows {
        attend_rows::<1>(shape, head, first + r, &q[r * hd..], &mut out[r * hd..]);
        r += 1;
    }
}

/// `R` consecutive query rows from row `first`, sharing each key and value
/// load; each row's arithmetic is exactly what it would be alone: a score
/// is a fused multiply-add over the dimensions in order, an output a fused
/// multiply-add over the keys in order, block by block.
#[inline(always)]
fn attend_rows<const R: usize>(
    shape: &Shape,
    head: &Head<'_>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let ranges: [std::ops::Range<usize>; R] = std::array::from_fn(|r| shape.keys_of(first + r));
    let rows: [&[f32]; R] = std::array::from_fn(|r| &q[r * hd..(r + 1) * hd]);
    let (lo, hi) = (ranges[0].start, ranges[R - 1].end);
    let mut max = [f32::NEG_INFINITY; R];
    let mut sum = [0f32; R];
    let mut probs = [[0f32; KEY_BLOCK]; R];
    let mut block = lo / KEY_BLOCK * KEY_BLOCK;
    while block < hi {
        let span = block.max(lo)..(block + KEY_BLOCK).min(hi);
        let mut chunk = span.start / KEY_CHUNK * KEY_CHUNK;
        while chunk < span.end {
            let s = scores::<R>(head.keys, chunk, rows);
            for r in 0..R {
                for (p, x) in probs[r][chunk - block..][..KEY_CHUNK].iter_mut().zip(s[r]) {
                    *p = x * shape.scale;
                }
            }
            chunk += KEY_CHUNK;
        }
        for r in 0..R {
            let mine = span.start.max(ranges[r].start)..span.end.min(ranges[r].end);
            if mine.is_empty() {
                continue;
            }
            let p = &mut probs[r][mine.start - block..mine.end - block];
            // A maximum is exact in any order, so it may take lanes.
            let block_max = lanes::<8>(p, f32::NEG_INFINITY, f32::max)
                .into_iter()
                .fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[r].max(block_max);
            // exp(-inf) = 0: the first block rescales nothing.
            let rescale = (max[r] - new_max).exp();
            max[r] = new_max;
            for x in p.iter_mut() {
                *x = exp(*x - new_max);
            }
            // Eight lanes by position in the row's own range, then in order.
            let block_sum: f32 = lanes::<8>(p, 0.0, |a, b| a + b).iter().sum();
            sum[r] = sum[r] * rescale + block_sum;
            let row_out = &mut out[r * hd..(r + 1) * hd];
            for o in row_out.iter_mut() {
                *o *= rescale;
            }
            accumulate_values(head.values, hd, mine.start, p, row_out);
        }
        block += KEY_BLOCK;
    }
    for r in 0..R {
        let inv = 1.0 / sum[r];
        for o in out[r * hd..(r + 1) * hd].iter_mut() {
            *o *= inv;
        }
    }
}

/// Scores of `R` query rows against the [`KEY_CHUNK`] keys from position
/// `chunk` (a multiple of it): per key, a fused multiply-add over the
/// dimensions in order.
#[inline(always)]
fn scores<const R: usize>(keys: &[f32], chunk: usize, rows: [&[f32]; R]) -> [[f32; KEY_CHUNK]; R] {
    let hd = rows[0].len();
    let block = &keys[chunk * hd..][..hd * KEY_CHUNK];
    let mut s = [[0f32; KEY_CHUNK]; R];
    for d in 0..hd {
        let k = &block[d * KEY_CHUNK..][..KEY_CHUNK];
        for r in 0..R {
            let qd = rows[r][d];
            for j in 0..KEY_CHUNK {
                s[r][j] = qd.mul_add(k[j], s[r][j]);
            }
        }
    }
    s
}

/// `xs` folded into `N` lanes, `x_i` into lane `i % N`, each lane in order.
#[inline(always)]
fn lanes<const N: usize>(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; N] {
    let mut acc = [init; N];
    let (whole, tail) = xs.as_chunks::<N>();
    for c in whole {
        for i in 0..N {
            acc[i] = f(acc[i], c[i]);
        }
    }
    for (i, &x) in tail.iter().enumerate() {
        acc[i] = f(acc[i], x);
    }
    acc
}

/// `out += Σ p_j · v_j` over the keys from `first`, in key order, a fused
/// multiply-add per element: 64 dimensions at a time in registers (eight
/// independent chains, so the adds' latency is hidden), then
/// [`DIM_CHUNK`], then one by one. Each element's arithmetic is the same
/// whichever way it is reached.
#[inline(always)]
fn accumulate_values(values: &[f32], hd: usize, first: usize, p: &[f32], out: &mut [f32]) {
    let mut d = 0;
    while d + 64 <= hd {
        accumulate_chunk::<64>(values, hd, first, p, &mut out[d..d + 64], d);
        d += 64;
    }
    while d + DIM_CHUNK <= hd {
        accumulate_chunk::<DIM_CHUNK>(values, hd, first, p, &mut out[d..d + DIM_CHUNK], d);
        d += DIM_CHUNK;
    }
    for (t, o) in out.iter_mut().enumerate().skip(d) {
        for (j, &pj) in p.iter().enumerate() {
            *o = pj.mul_add(values[(first + j) * hd + t], *o);
        }
    }
}

/// [`accumulate_values`] for dimensions `d..d + C`, held in registers.
#[inline(always)]
fn accumulate_chunk<const C: usize>(
    values: &[f32],
    hd: usize,
    first: usize,
    p: &[f32],
    out: &mut [f32],
    d: usize,
) {
    let mut acc: [f32; C] = std::array::from_fn(|t| out[t]);
    for (j, &pj) in p.iter().enumerate() {
        let v = &values[(first + j) * hd + d..][..C];
        for t in 0..C {
            acc[t] = pj.mul_add(v[t], acc[t]);
        }
    }
    out.copy_from_slice(&acc);
}

#[cfg(test)]
mod tests;
