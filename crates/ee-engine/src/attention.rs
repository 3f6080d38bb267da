//! Decode attention: one new token against its sequence's KV cache, read in
//! place, with an AVX2 build chosen at run time.

use candle_core::{Device, Tensor};

use crate::float::dot;
use crate::Error;

/// Attention of one new token over its cache, read in place: a decode step
/// costs a dot product per cached key instead of copying the cache for every
/// q-head. `q` is `[n_head, 1, hd]`; `k`, `v` are cache views
/// `[n_kv, total, hd]` (rows contiguous, heads `stride[0]` apart). Only the
/// last `sliding_window` positions are attended to, when there is one.
/// Returns `[1, n_head * hd]`.
pub(crate) fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sliding_window: Option<usize>,
) -> Result<Tensor, Error> {
    let (n_head, _, hd) = q.dims3()?;
    let (n_kv_head, total, _) = k.dims3()?;
    let first = sliding_window.map_or(0, |w| total.saturating_sub(w));
    let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let scale = 1.0 / (hd as f32).sqrt();
    let (k_store, k_layout) = k.storage_and_layout();
    let (v_store, v_layout) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(k_cpu), candle_core::Storage::Cpu(v_cpu)) =
        (&*k_store, &*v_store)
    else {
        return Err(Error::Model("decode attention runs on the CPU".into()));
    };
    let (k_data, v_data) = (k_cpu.as_slice::<f32>()?, v_cpu.as_slice::<f32>()?);
    let (k_stride, v_stride) = (k_layout.stride(), v_layout.stride());
    if k_stride[1] != hd || k_stride[2] != 1 || v_stride[1] != hd || v_stride[2] != 1 {
        return Err(Error::Model("unexpected KV cache layout".into()));
    }
    let mut out = vec![0f32; n_head * hd];
    attend(
        &OneTokenAttention {
            q: &q,
            keys: &k_data[k_layout.start_offset()..],
            values: &v_data[v_layout.start_offset()..],
            k_head_stride: k_stride[0],
            v_head_stride: v_stride[0],
            head_dim: hd,
            group: n_head / n_kv_head,
            positions: first..total,
            scale,
        },
        &mut out,
    );
    Ok(Tensor::from_vec(out, (1, n_head * hd), &Device::Cpu)?)
}

/// One new token's attention over cached keys and values, per q-head.
struct OneTokenAttention<'a> {
    /// `[n_head * head_dim]`.
    q: &'a [f32],
    /// Cache storage from the layer's first key/value: rows of `head_dim`,
    /// kv-heads `*_head_stride` apart.
    keys: &'a [f32],
    values: &'a [f32],
    k_head_stride: usize,
    v_head_stride: usize,
    head_dim: usize,
    /// q-heads per kv-head.
    group: usize,
    /// Cached positions attended to.
    positions: std::ops::Range<usize>,
    scale: f32,
}

/// Runs [`attend_portable`], as an AVX2 build when the CPU has it: the same
/// operations in the same order, so the same bits, in wider registers.
fn attend(a: &OneTokenAttention<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { attend_avx2(a, out) };
    }
    attend_portable(a, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(a: &OneTokenAttention<'_>, out: &mut [f32]) {
    attend_portable(a, out)
}

/// Softmax-weighted sum of values for each q-head; `out` is `[n_head * hd]`.
#[inline(always)]
fn attend_portable(a: &OneTokenAttention<'_>, out: &mut [f32]) {
    let hd = a.head_dim;
    let mut scores = vec![0f32; a.positions.len()];
    for (h, (qh, oh)) in
        a.q.chunks_exact(hd)
            .zip(out.chunks_exact_mut(hd))
            .enumerate()
    {
        let keys = &a.keys[(h / a.group) * a.k_head_stride..];
        let values = &a.values[(h / a.group) * a.v_head_stride..];
        let mut max = f32::NEG_INFINITY;
        for (s, score) in a.positions.clone().zip(scores.iter_mut()) {
            *score = dot(qh, &keys[s * hd..][..hd]) * a.scale;
            max = max.max(*score);
        }
        let mut sum = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        for (s, p) in a.positions.clone().zip(&scores) {
            let w = p / sum;
            for (o, x) in oh.iter_mut().zip(&values[s * hd..][..hd]) {
                *o += w * x;
            }
        }
    }
}
