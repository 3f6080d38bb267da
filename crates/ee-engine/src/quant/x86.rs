//! The x86-64 SIMD kernels of [`super`]: AVX2, and AVX-512 VNNI where the
//! CPU has it. Each kernel computes what its portable twin in `super`
//! computes; the AVX2 and VNNI builds give bit-identical results.

use std::arch::x86_64::*;

use super::{quantize_block, ActBlock, BLOCK};

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_activations_avx2(x: &[f32]) -> Vec<ActBlock> {
    let mut blocks = Vec::with_capacity(x.len() / BLOCK);
    for block in x.chunks_exact(BLOCK) {
        blocks.push(quantize_block(block));
    }
    blocks
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(acc: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
}

/// Q8_0 dot products of one weight row with `N` activation rows: each
/// weight block's sign split is shared by the rows. `dot` sums products of
/// unsigned by signed bytes, four adjacent ones per i32 lane.
#[inline(always)]
unsafe fn q8_0_rows<const N: usize>(
    w_s: &[f32],
    w_q: &[[i8; BLOCK]],
    a: [&[ActBlock]; N],
    dot: impl Fn(__m256i, __m256i) -> __m256i,
) -> [f32; N] {
    let nb = w_s.len().min(w_q.len());
    assert!(a.iter().all(|a| a.len() >= nb));
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, (s, q)) in w_s.iter().zip(w_q).enumerate() {
        let w = _mm256_loadu_si256(q.as_ptr().cast());
        // The byte products take u8 x i8: move w's sign onto x (ggml's trick).
        let w_abs = _mm256_sign_epi8(w, w);
        for (acc, a) in acc.iter_mut().zip(&a) {
            // SAFETY: b < nb <= a.len(), checked above.
            let x = a.get_unchecked(b);
            let x_signed = _mm256_sign_epi8(_mm256_loadu_si256(x.q.as_ptr().cast()), w);
            let sums = dot(w_abs, x_signed);
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(s * x.d), _mm256_cvtepi32_ps(sums), *acc);
        }
    }
    acc.map(|acc| hsum(acc))
}

/// Q4_1 dot products of one weight row with `N` activation rows: each
/// weight block is unpacked once, and the `N` accumulators are independent.
/// For more than four rows the min terms are summed in a second pass, which
/// keeps eight accumulators in registers (each row's min sum is its own
/// chain either way, so the bits are the same). `dot` as for [`q8_0_rows`].
#[inline(always)]
unsafe fn q4_1_rows<const N: usize>(
    w_s: &[[f32; 2]],
    w_q: &[[u8; 16]],
    a: [&[ActBlock]; N],
    dot: impl Fn(__m256i, __m256i) -> __m256i,
) -> [f32; N] {
    let nb = w_s.len().min(w_q.len());
    assert!(a.iter().all(|a| a.len() >= nb));
    let low = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut min = [0f32; N];
    let min_inline = N <= 4;
    for (b, (s, q)) in w_s.iter().zip(w_q).enumerate() {
        let packed = _mm_loadu_si128(q.as_ptr().cast());
        let w = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(packed, 4), low),
            _mm_and_si128(packed, low),
        );
        for (acc, a) in acc.iter_mut().zip(&a) {
            // SAFETY: b < nb <= a.len(), checked above.
            let x = a.get_unchecked(b);
            let sums = dot(w, _mm256_loadu_si256(x.q.as_ptr().cast()));
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(s[0] * x.d), _mm256_cvtepi32_ps(sums), *acc);
        }
        if min_inline {
            for (min, a) in min.iter_mut().zip(&a) {
                *min += s[1] * a.get_unchecked(b).s;
            }
        }
    }
    if !min_inline {
        // The rows' sums are independent chains, interleaved so they overlap.
        for (b, s) in w_s.iter().enumerate() {
            for (min, a) in min.iter_mut().zip(&a) {
                *min += s[1] * a.get_unchecked(b).s;
            }
        }
    }
    std::array::from_fn(|k| hsum(acc[k]) + min[k])
}

/// AVX2 byte dot products: pairs to i16, then pairs of those to i32. Pairs
/// never saturate i16 here: at most 2 * 127 * 128 (Q8_0), 2 * 15 * 127 (Q4_1).
#[inline(always)]
unsafe fn maddubs_i32(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// VNNI byte dot products: the same i32 lanes in one instruction.
#[inline(always)]
unsafe fn dpbusd_i32(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_q8_0_avx2<const N: usize>(
    w_s: &[f32],
    w_q: &[[i8; BLOCK]],
    a: [&[ActBlock]; N],
) -> [f32; N] {
    q8_0_rows(w_s, w_q, a, |w, x| maddubs_i32(w, x))
}

#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
pub(super) unsafe fn dot_q8_0_vnni<const N: usize>(
    w_s: &[f32],
    w_q: &[[i8; BLOCK]],
    a: [&[ActBlock]; N],
) -> [f32; N] {
    q8_0_rows(w_s, w_q, a, |w, x| dpbusd_i32(w, x))
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_q4_1_avx2<const N: usize>(
    w_s: &[[f32; 2]],
    w_q: &[[u8; 16]],
    a: [&[ActBlock]; N],
) -> [f32; N] {
    q4_1_rows(w_s, w_q, a, |w, x| maddubs_i32(w, x))
}

#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
pub(super) unsafe fn dot_q4_1_vnni<const N: usize>(
    w_s: &[[f32; 2]],
    w_q: &[[u8; 16]],
    a: [&[ActBlock]; N],
) -> [f32; N] {
    q4_1_rows(w_s, w_q, a, |w, x| dpbusd_i32(w, x))
}
