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
//! where the CPU has no FMA), and an f16 cache's elements widen to f32
//! exactly (F16C's `vcvtph2ps` in the SIMD builds, bit operations in the
//! portable one).

use std::ops::Range;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::activation::exp;
use crate::float::Widen;
use crate::kv_cache::{KvSlice, LayerView, KEY_CHUNK};
use crate::Error;

/// Keys per block of the online softmax, at fixed absolute positions.
const KEY_BLOCK: usize = 64;
// A block is whole chunks of keys.
const _: () = assert!(KEY_BLOCK.is_multiple_of(KEY_CHUNK));
/// Query rows per parallel task.
const QUERY_TILE: usize = 32;
/// Query rows sharing each key load, and each value load where their keys
/// overlap.
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
    let out = match (cache.keys, cache.values) {
        (KvSlice::F16(k), KvSlice::F16(v)) => attend_heads(&shape, &q, n, k, v, per_head),
        (KvSlice::F32(k), KvSlice::F32(v)) => attend_heads(&shape, &q, n, k, v, per_head),
        _ => return Err(Error::Model("keys and values differ in type".into())),
    };
    let out = Tensor::from_vec(out, (n_head, n, hd), &Device::Cpu)?;
    Ok(out.transpose(0, 1)?.reshape((n, n_head * hd))?)
}

/// Output `[n_head, n, hd]` for queries `q` (the same shape) over a cache's
/// keys and values (`per_head` elements per kv-head), one task per (head,
/// tile of query rows).
fn attend_heads<E: Widen>(
    shape: &Shape,
    q: &[f32],
    n: usize,
    keys: &[E],
    values: &[E],
    per_head: usize,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let mut out = vec![0f32; q.len()];
    out.par_chunks_mut(n * hd)
        .zip(q.par_chunks(n * hd))
        .enumerate()
        .for_each(|(h, (head_out, head_q))| {
            let kv = h / shape.group;
            let head = Head {
                keys: &keys[kv * per_head..][..per_head],
                values: &values[kv * per_head..][..per_head],
            };
            head_out
                .par_chunks_mut(QUERY_TILE * hd)
                .zip(head_q.par_chunks(QUERY_TILE * hd))
                .enumerate()
                .for_each(|(t, (tile_out, tile_q))| {
                    attend_tile(shape, &head, t * QUERY_TILE, tile_q, tile_out)
                });
        });
    out
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
struct Head<'a, E> {
    keys: &'a [E],
    values: &'a [E],
}

/// The first `N` elements of `src`, widened exactly. `F16C`: the build
/// was compiled for AVX2 and F16C (its caller checked the CPU), so eight
/// at a time take one instruction.
#[inline(always)]
fn widen<E: Widen, const N: usize, const F16C: bool>(src: &[E]) -> [f32; N] {
    let src = &src[..N];
    let mut out = [0f32; N];
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if F16C {
        while i + 8 <= N {
            // SAFETY: 8 elements from `i` lie in `src` and in `out`;
            // `F16C` builds run only where the CPU has AVX2 and F16C.
            unsafe {
                let wide = E::load8(src[i..].as_ptr());
                std::arch::x86_64::_mm256_storeu_ps(out[i..].as_mut_ptr(), wide);
            }
            i += 8;
        }
    }
    for (o, x) in out[i..].iter_mut().zip(&src[i..]) {
        *o = x.to_f32();
    }
    out
}

impl Shape {
    /// The keys query row `i` (a new token) attends to.
    fn keys_of(&self, i: usize) -> Range<usize> {
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
fn attend_tile<E: Widen>(
    shape: &Shape,
    head: &Head<'_, E>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU reports AVX-512F, AVX2, FMA and F16C.
        return unsafe { attend_tile_avx512(shape, head, first, q, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_f16c() {
        // SAFETY: the CPU reports AVX2, FMA and F16C.
        return unsafe { attend_tile_avx2(shape, head, first, q, out) };
    }
    attend_tile_portable::<E, false, false>(shape, head, first, q, out)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_f16c() -> bool {
    crate::quant::has_avx2() && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_tile_avx2<E: Widen>(
    shape: &Shape,
    head: &Head<'_, E>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    attend_tile_portable::<E, true, false>(shape, head, first, q, out)
}

/// The same again with 512-bit vectors: a key chunk's 32 scores are two
/// registers, not four, and rows that share values accumulate twice the
/// dimensions at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_tile_avx512<E: Widen>(
    shape: &Shape,
    head: &Head<'_, E>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    attend_tile_portable::<E, true, true>(shape, head, first, q, out)
}

/// The kernel, inlined into each build. `F16C`: the build may widen f16
/// with F16C; `WIDE`: it has 32 vector registers (AVX-512), enough for
/// [`MICRO_ROWS`] rows of 32 value dimensions.
#[inline(always)]
fn attend_tile_portable<E: Widen, const F16C: bool, const WIDE: bool>(
    shape: &Shape,
    head: &Head<'_, E>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let rows = q.len() / hd;
    let mut r = 0;
    while r + MICRO_ROWS <= rows {
        attend_rows::<MICRO_ROWS, E, F16C, WIDE>(
            shape,
            head,
            first + r,
            &q[r * hd..],
            &mut out[r * hd..],
        );
        r += MICRO_ROWS;
    }
    while r < rows {
        attend_rows::<1, E, F16C, WIDE>(shape, head, first + r, &q[r * hd..], &mut out[r * hd..]);
        r += 1;
    }
}

/// `R` consecutive query rows from row `first`, sharing each key and value
/// load; each row's arithmetic is exactly what it would be alone: a score
/// is a fused multiply-add over the dimensions in order, an output a fused
/// multiply-add over the keys in order, block by block.
#[inline(always)]
fn attend_rows<const R: usize, E: Widen, const F16C: bool, const WIDE: bool>(
    shape: &Shape,
    head: &Head<'_, E>,
    first: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let ranges: [Range<usize>; R] = std::array::from_fn(|r| shape.keys_of(first + r));
    // The rows' queries by dimension, so that a score's operands are one
    // load of each.
    let q_by_dim: Vec<[f32; R]> = (0..hd)
        .map(|d| std::array::from_fn(|r| q[r * hd + d]))
        .collect();
    let (lo, hi) = (ranges[0].start, ranges[R - 1].end);
    let mut max = [f32::NEG_INFINITY; R];
    let mut sum = [0f32; R];
    let mut probs = [[0f32; KEY_BLOCK]; R];
    let mut block = lo / KEY_BLOCK * KEY_BLOCK;
    while block < hi {
        let span = block.max(lo)..(block + KEY_BLOCK).min(hi);
        let mut chunk = span.start / KEY_CHUNK * KEY_CHUNK;
        while chunk < span.end {
            let s = scores::<R, E, F16C>(head.keys, chunk, &q_by_dim);
            for r in 0..R {
                for (p, x) in probs[r][chunk - block..][..KEY_CHUNK].iter_mut().zip(s[r]) {
                    *p = x * shape.scale;
                }
            }
            chunk += KEY_CHUNK;
        }
        // Each row's keys in this block.
        let mine: [Range<usize>; R] =
            std::array::from_fn(|r| span.start.max(ranges[r].start)..span.end.min(ranges[r].end));
        for r in 0..R {
            if mine[r].is_empty() {
                continue;
            }
            let p = &mut probs[r][mine[r].start - block..mine[r].end - block];
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
            for o in out[r * hd..(r + 1) * hd].iter_mut() {
                *o *= rescale;
            }
        }
        accumulate_block::<R, E, F16C, WIDE>(head.values, hd, block, &mine, &probs, out);
        block += KEY_BLOCK;
    }
    for r in 0..R {
        let inv = 1.0 / sum[r];
        for o in out[r * hd..(r + 1) * hd].iter_mut() {
            *o *= inv;
        }
    }
}

/// `out_r += Σ p_rj · v_j` for each row `r` over its keys `mine[r]` in a
/// block from key `block` (`probs[r]` indexed from it). The keys every row
/// has are accumulated for all rows at once, each value load shared; a
/// row's others (a sliding window's start, the causal end) on their own,
/// before and after, so each row still adds its keys in order.
#[inline(always)]
fn accumulate_block<const R: usize, E: Widen, const F16C: bool, const WIDE: bool>(
    values: &[E],
    hd: usize,
    block: usize,
    mine: &[Range<usize>; R],
    probs: &[[f32; KEY_BLOCK]; R],
    out: &mut [f32],
) {
    let p = |r: usize, keys: &Range<usize>| &probs[r][keys.start - block..keys.end - block];
    let shared = mine.iter().map(|m| m.start).max().unwrap_or(0)
        ..mine.iter().map(|m| m.end).min().unwrap_or(0);
    if R == 1 || shared.is_empty() {
        for r in 0..R {
            let keys = &mine[r];
            if !keys.is_empty() {
                let row_out = &mut out[r * hd..(r + 1) * hd];
                accumulate_values::<E, F16C>(values, hd, keys.start, p(r, keys), row_out);
            }
        }
        return;
    }
    for r in 0..R {
        let before = mine[r].start..shared.start;
        let row_out = &mut out[r * hd..(r + 1) * hd];
        accumulate_values::<E, F16C>(values, hd, before.start, p(r, &before), row_out);
    }
    let shared_p: [&[f32]; R] = std::array::from_fn(|r| p(r, &shared));
    let mut d = 0;
    if WIDE {
        while d + 32 <= hd {
            accumulate_rows::<R, 32, E, F16C>(values, hd, shared.start, shared_p, out, d);
            d += 32;
        }
    }
    while d + DIM_CHUNK <= hd {
        accumulate_rows::<R, DIM_CHUNK, E, F16C>(values, hd, shared.start, shared_p, out, d);
        d += DIM_CHUNK;
    }
    for r in 0..R {
        let row_out = &mut out[r * hd..(r + 1) * hd];
        accumulate_dims(values, hd, shared.start, shared_p[r], row_out, d);
        let after = shared.end..mine[r].end;
        accumulate_values::<E, F16C>(values, hd, after.start, p(r, &after), row_out);
    }
}

/// Scores of `R` query rows (`q_by_dim[d][r]`) against the [`KEY_CHUNK`]
/// keys from position `chunk` (a multiple of it): per key, a fused
/// multiply-add over the dimensions in order.
#[inline(always)]
fn scores<const R: usize, E: Widen, const F16C: bool>(
    keys: &[E],
    chunk: usize,
    q_by_dim: &[[f32; R]],
) -> [[f32; KEY_CHUNK]; R] {
    let hd = q_by_dim.len();
    let block = &keys[chunk * hd..][..hd * KEY_CHUNK];
    let mut s = [[0f32; KEY_CHUNK]; R];
    for (qd, k) in q_by_dim.iter().zip(block.chunks_exact(KEY_CHUNK)) {
        let k = widen::<E, KEY_CHUNK, F16C>(k);
        for r in 0..R {
            for j in 0..KEY_CHUNK {
                s[r][j] = qd[r].mul_add(k[j], s[r][j]);
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
fn accumulate_values<E: Widen, const F16C: bool>(
    values: &[E],
    hd: usize,
    first: usize,
    p: &[f32],
    out: &mut [f32],
) {
    if p.is_empty() {
        return;
    }
    let mut d = 0;
    while d + 64 <= hd {
        accumulate_rows::<1, 64, E, F16C>(values, hd, first, [p], out, d);
        d += 64;
    }
    while d + DIM_CHUNK <= hd {
        accumulate_rows::<1, DIM_CHUNK, E, F16C>(values, hd, first, [p], out, d);
        d += DIM_CHUNK;
    }
    accumulate_dims(values, hd, first, p, out, d);
}

/// [`accumulate_values`] for one row's dimensions from `d` on, one by one.
#[inline(always)]
fn accumulate_dims<E: Widen>(
    values: &[E],
    hd: usize,
    first: usize,
    p: &[f32],
    out: &mut [f32],
    d: usize,
) {
    for (t, o) in out.iter_mut().enumerate().skip(d) {
        for (j, &pj) in p.iter().enumerate() {
            *o = pj.mul_add(widen::<E, 1, false>(&values[(first + j) * hd + t..])[0], *o);
        }
    }
}

/// [`accumulate_values`] for dimensions `d..d + C` of `R` consecutive rows
/// of `out` (`hd` apart), held in registers, each value load shared by the
/// rows: `p[r]` are row `r`'s probabilities of the keys from `first`.
#[inline(always)]
fn accumulate_rows<const R: usize, const C: usize, E: Widen, const F16C: bool>(
    values: &[E],
    hd: usize,
    first: usize,
    p: [&[f32]; R],
    out: &mut [f32],
    d: usize,
) {
    let mut acc: [[f32; C]; R] =
        std::array::from_fn(|r| std::array::from_fn(|t| out[r * hd + d + t]));
    let n = p[0].len();
    let p = p.map(|p| &p[..n]);
    // Key j's dimensions from d are the start of the j-th piece.
    for (j, v) in values[first * hd + d..(first + n) * hd]
        .chunks(hd)
        .enumerate()
    {
        let v = widen::<E, C, F16C>(v);
        for r in 0..R {
            let pj = p[r][j];
            for t in 0..C {
                acc[r][t] = pj.mul_add(v[t], acc[r][t]);
            }
        }
    }
    for r in 0..R {
        out[r * hd + d..][..C].copy_from_slice(&acc[r]);
    }
}

#[cfg(test)]
mod tests;
