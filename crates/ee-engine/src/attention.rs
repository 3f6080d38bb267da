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
//! Every query row is computed by the same operations in the same order,
//! whatever tile, chunk or batch it arrives in: block boundaries sit at
//! fixed absolute key positions, each score is [`crate::float::dot`]'s sum,
//! and values are accumulated in key order. So a token attends with the same
//! bits whether it is prefilled in one chunk or another, or decoded, and
//! the encrypted model (same path) stays bit-identical to the plaintext one.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::float::dot_n;
use crate::Error;

/// Keys per block of the online softmax, at fixed absolute positions.
const KEY_BLOCK: usize = 64;
/// Query rows per parallel task.
const QUERY_TILE: usize = 16;
/// Query rows sharing each key load.
const MICRO_ROWS: usize = 4;

/// Attention of `n` new tokens at positions `pos..pos + n` over everything
/// cached for their sequence, themselves included. `q` is `[n_head, n, hd]`;
/// `k`, `v` are cache views `[n_kv, total, hd]` (rows contiguous, heads
/// `stride[0]` apart) with `total = pos + n`. Causal; only the last
/// `sliding_window` positions are attended to, when there is one. Returns
/// `[n, n_head * hd]`.
///
/// # Errors
/// Tensors that are not on the CPU, or a cache layout other than the above.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sliding_window: Option<usize>,
) -> Result<Tensor, Error> {
    let (n_head, n, hd) = q.dims3()?;
    let (n_kv_head, total, _) = k.dims3()?;
    if total < n || n_kv_head == 0 || n_head % n_kv_head != 0 {
        return Err(Error::Model("attention shapes do not match".into()));
    }
    let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let (k_store, k_layout) = k.storage_and_layout();
    let (v_store, v_layout) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(k_cpu), candle_core::Storage::Cpu(v_cpu)) =
        (&*k_store, &*v_store)
    else {
        return Err(Error::Model("attention runs on the CPU".into()));
    };
    let (k_data, v_data) = (k_cpu.as_slice::<f32>()?, v_cpu.as_slice::<f32>()?);
    let (k_stride, v_stride) = (k_layout.stride(), v_layout.stride());
    if k_stride[1] != hd || k_stride[2] != 1 || v_stride[1] != hd || v_stride[2] != 1 {
        return Err(Error::Model("unexpected KV cache layout".into()));
    }
    let shape = Shape {
        head_dim: hd,
        group: n_head / n_kv_head,
        first_pos: total - n,
        sliding_window,
        scale: 1.0 / (hd as f32).sqrt(),
        k_head_stride: k_stride[0],
        v_head_stride: v_stride[0],
    };
    let (keys, values) = (
        &k_data[k_layout.start_offset()..],
        &v_data[v_layout.start_offset()..],
    );
    // Output `[n_head, n, hd]`, one task per (head, tile of query rows).
    let mut out = vec![0f32; n_head * n * hd];
    out.par_chunks_mut(n * hd)
        .zip(q.par_chunks(n * hd))
        .enumerate()
        .for_each(|(h, (head_out, head_q))| {
            let kv = h / shape.group;
            let head = Head {
                keys: &keys[kv * shape.k_head_stride..],
                values: &values[kv * shape.v_head_stride..],
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
    k: &Tensor,
    v: &Tensor,
    sliding_window: Option<usize>,
) -> Result<Tensor, Error> {
    let (n_head, n, hd) = q.dims3()?;
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

/// What every row of one call shares.
struct Shape {
    head_dim: usize,
    /// q-heads per kv-head (GQA).
    group: usize,
    /// Position of the first new token.
    first_pos: usize,
    sliding_window: Option<usize>,
    scale: f32,
    k_head_stride: usize,
    v_head_stride: usize,
}

/// One kv-head's cached keys and values, rows of `head_dim` from position 0.
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

/// Rows `first..first + q.len() / hd` of one head, as an AVX2 build when the
/// CPU has it: the same operations in the same order, so the same bits.
fn attend_tile(shape: &Shape, head: &Head<'_>, first: usize, q: &[f32], out: &mut [f32]) {
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
/// load; each row's arithmetic is exactly what it would be alone.
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
    let mut acc = vec![0f32; R * hd];
    let mut scores = [[0f32; KEY_BLOCK]; R];
    let mut block = lo / KEY_BLOCK * KEY_BLOCK;
    while block < hi {
        let span = block.max(lo)..(block + KEY_BLOCK).min(hi);
        for j in span.clone() {
            let s = dot_n(&head.keys[j * hd..(j + 1) * hd], rows);
            for r in 0..R {
                scores[r][j - block] = s[r] * shape.scale;
            }
        }
        for r in 0..R {
            let mine = span.start.max(ranges[r].start)..span.end.min(ranges[r].end);
            if mine.is_empty() {
                continue;
            }
            let block_scores = &mut scores[r][mine.start - block..mine.end - block];
            let block_max = block_scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let new_max = max[r].max(block_max);
            // exp(-inf) = 0: the first block rescales nothing.
            let rescale = (max[r] - new_max).exp();
            max[r] = new_max;
            sum[r] *= rescale;
            let row_acc = &mut acc[r * hd..(r + 1) * hd];
            for a in row_acc.iter_mut() {
                *a *= rescale;
            }
            for s in block_scores.iter_mut() {
                *s = (*s - new_max).exp();
                sum[r] += *s;
            }
            for (j, &p) in mine.zip(block_scores.iter()) {
                for (a, &x) in row_acc.iter_mut().zip(&head.values[j * hd..(j + 1) * hd]) {
                    *a += p * x;
                }
            }
        }
        block += KEY_BLOCK;
    }
    for r in 0..R {
        let inv = 1.0 / sum[r];
        for (o, a) in out[r * hd..(r + 1) * hd].iter_mut().zip(&acc[r * hd..]) {
            *o = a * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain causal attention, one row at a time, as the definition reads.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (n_head, n_kv, n, total, hd): (usize, usize, usize, usize, usize),
        window: Option<usize>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; n * n_head * hd];
        for h in 0..n_head {
            let kv = h / (n_head / n_kv);
            for i in 0..n {
                let pos = total - n + i;
                let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let qi = &q[(h * n + i) * hd..][..hd];
                let scores: Vec<f64> = (start..=pos)
                    .map(|j| {
                        let kj = &k[(kv * total + j) * hd..][..hd];
                        qi.iter().zip(kj).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                for (e, j) in exps.iter().zip(start..=pos) {
                    let vj = &v[(kv * total + j) * hd..][..hd];
                    for d in 0..hd {
                        out[(i * n_head + h) * hd + d] += (e / sum * f64::from(vj[d])) as f32;
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_plain_attention_for_prefill_decode_gqa_and_windows() {
        // (n_head, n_kv, n new, total, head_dim, window)
        for (n_head, n_kv, n, total, hd, window) in [
            (4, 2, 37, 37, 64, None),
            (4, 2, 37, 200, 64, None),
            (3, 1, 1, 150, 64, None),
            (2, 2, 70, 130, 32, Some(50)),
            (2, 1, 1, 300, 16, Some(64)),
            (6, 3, 5, 5, 64, None),
        ] {
            let q = values(n_head * n * hd, 1);
            let k = values(n_kv * total * hd, 2);
            let v = values(n_kv * total * hd, 3);
            let t = |data: &[f32], shape: (usize, usize, usize)| {
                Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
            };
            let ours = attention(
                &t(&q, (n_head, n, hd)),
                &t(&k, (n_kv, total, hd)),
                &t(&v, (n_kv, total, hd)),
                window,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let want = reference(&q, &k, &v, (n_head, n_kv, n, total, hd), window);
            let worst = ours
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 1e-5, "{n_head} {n_kv} {n} {total} {hd} {window:?}: {worst}");
        }
    }

    #[test]
    fn the_reference_path_computes_the_same_attention() {
        let (n_head, n_kv, n, total, hd) = (4, 2, 20, 100, 64);
        let t = |seed, shape: (usize, usize, usize)| {
            Tensor::from_vec(values(shape.0 * shape.1 * shape.2, seed), shape, &Device::Cpu)
                .unwrap()
        };
        let (q, k, v) = (t(7, (n_head, n, hd)), t(8, (n_kv, total, hd)), t(9, (n_kv, total, hd)));
        for window in [None, Some(30)] {
            let a = attention(&q, &k, &v, window).unwrap();
            let b = reference_attention(&q, &k, &v, window).unwrap();
            let worst = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(worst.to_scalar::<f32>().unwrap() < 1e-5, "{window:?}");
        }
    }

    #[test]
    fn a_row_has_the_same_bits_in_any_chunk() {
        let (n_head, n_kv, total, hd) = (2, 1, 90, 64);
        let q = values(n_head * total * hd, 4);
        let k = Tensor::from_vec(values(n_kv * total * hd, 5), (n_kv, total, hd), &Device::Cpu)
            .unwrap();
        let v = Tensor::from_vec(values(n_kv * total * hd, 6), (n_kv, total, hd), &Device::Cpu)
            .unwrap();
        let q_all = Tensor::from_vec(q, (n_head, total, hd), &Device::Cpu).unwrap();
        let whole = attention(&q_all, &k, &v, None).unwrap();
        // The last 7 rows as a chunk of their own, and the last row alone.
        for n in [7, 1] {
            let q_tail = q_all.narrow(1, total - n, n).unwrap();
            let part = attention(&q_tail, &k, &v, None).unwrap();
            let expected = whole.narrow(0, total - n, n).unwrap();
            assert_eq!(
                part.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
