//! The x86-64 SIMD kernels of the 32-value block formats (`super::legacy`):
//! AVX2, and AVX-512 VNNI where the CPU has it. Each computes what its
//! portable twin computes; the AVX2 and VNNI builds give bit-identical
//! results (the same integer sums, the same float operations in order).

use std::arch::x86_64::*;

use super::legacy::{quantize_block, ActBlock, BLOCK, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_activations_avx2(x: &[f32]) -> Vec<ActBlock> {
    let mut blocks = Vec::with_capacity(x.len() / BLOCK);
    for block in x.chunks_exact(BLOCK) {
        blocks.push(quantize_block(block));
    }
    blocks
}

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hsum(acc: __m256) -> f32 {
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
}

/// Dot products of one weight row with `N` activation rows, for formats
/// whose codes are signed (Q8_0, Q4_0, Q5_0): `load` gives a block's scale
/// and its 32 codes as i8. Each block's sign split is shared by the rows.
/// `dot` sums products of unsigned by signed bytes, four adjacent ones per
/// i32 lane.
#[inline(always)]
unsafe fn signed_rows<W, const N: usize>(
    w: &[W],
    a: [&[ActBlock]; N],
    load: impl Fn(&W) -> (f32, __m256i),
    dot: impl Fn(__m256i, __m256i) -> __m256i,
) -> [f32; N] {
    assert!(a.iter().all(|a| a.len() >= w.len()));
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, w) in w.iter().enumerate() {
        let (d, w) = load(w);
        // The byte products take u8 x i8: move w's sign onto x (ggml's trick).
        let w_abs = _mm256_sign_epi8(w, w);
        for (acc, a) in acc.iter_mut().zip(&a) {
            // SAFETY: b < w.len() <= a.len(), checked above.
            let x = a.get_unchecked(b);
            let x_signed = _mm256_sign_epi8(_mm256_loadu_si256(x.q.as_ptr().cast()), w);
            let sums = dot(w_abs, x_signed);
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sums), *acc);
        }
    }
    acc.map(|acc| hsum(acc))
}

/// As [`signed_rows`] for the formats with a min (Q4_1, Q5_1): `load` gives
/// `[d, m]` and the unsigned codes, and `m` multiplies each activation
/// block's sum. For more than four rows the min terms are summed in a second
/// pass, which keeps eight accumulators in registers (each row's min sum is
/// its own chain either way, so the bits are the same).
#[inline(always)]
unsafe fn affine_rows<W, const N: usize>(
    w: &[W],
    a: [&[ActBlock]; N],
    load: impl Fn(&W) -> ([f32; 2], __m256i),
    dot: impl Fn(__m256i, __m256i) -> __m256i,
) -> [f32; N] {
    assert!(a.iter().all(|a| a.len() >= w.len()));
    let mut acc = [_mm256_setzero_ps(); N];
    let mut min = [0f32; N];
    let min_inline = N <= 4;
    for (b, w) in w.iter().enumerate() {
        let ([d, m], codes) = load(w);
        for (acc, a) in acc.iter_mut().zip(&a) {
            // SAFETY: b < w.len() <= a.len(), checked above.
            let x = a.get_unchecked(b);
            let sums = dot(codes, _mm256_loadu_si256(x.q.as_ptr().cast()));
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sums), *acc);
        }
        if min_inline {
            for (min, a) in min.iter_mut().zip(&a) {
                *min += m * a.get_unchecked(b).s;
            }
        }
    }
    if !min_inline {
        // The rows' sums are independent chains, interleaved so they overlap.
        for (b, w) in w.iter().enumerate() {
            let ([_, m], _) = load(w);
            for (min, a) in min.iter_mut().zip(&a) {
                *min += m * a.get_unchecked(b).s;
            }
        }
    }
    std::array::from_fn(|k| hsum(acc[k]) + min[k])
}

/// Sixteen packed bytes as 32 codes: low nibbles, then high nibbles.
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    let packed = _mm_loadu_si128(qs.as_ptr().cast());
    let low = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(packed, 4), low),
        _mm_and_si128(packed, low),
    )
}

/// The fifth bits of a 5-bit block as 32 bytes of 0 or 16: byte `j` takes
/// byte `j / 8` of `qh` and tests bit `j % 8` of it.
#[inline(always)]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(16))
}

/// AVX2 byte dot products: pairs to i16, then pairs of those to i32. Pairs
/// never saturate i16 here: at most 2 * 127 * 128 (Q8_0), 2 * 31 * 127 (Q5_1).
#[inline(always)]
pub(super) unsafe fn maddubs_i32(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// VNNI byte dot products: the same i32 lanes in one instruction.
#[inline(always)]
unsafe fn dpbusd_i32(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

/// One format's AVX2 and VNNI builds of a row kernel.
macro_rules! builds {
    ($avx2:ident, $vnni:ident, $block:ty, $rows:ident, $load:expr) => {
        #[target_feature(enable = "avx2,fma")]
        pub(super) unsafe fn $avx2<const N: usize>(w: &[$block], a: [&[ActBlock]; N]) -> [f32; N] {
            $rows(w, a, $load, |w, x| maddubs_i32(w, x))
        }

        #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
        pub(super) unsafe fn $vnni<const N: usize>(w: &[$block], a: [&[ActBlock]; N]) -> [f32; N] {
            $rows(w, a, $load, |w, x| dpbusd_i32(w, x))
        }
    };
}

builds!(
    dot_q8_0_avx2,
    dot_q8_0_vnni,
    Q8_0,
    signed_rows,
    |w: &Q8_0| { (w.d, _mm256_loadu_si256(w.qs.as_ptr().cast())) }
);
builds!(
    dot_q4_0_avx2,
    dot_q4_0_vnni,
    Q4_0,
    signed_rows,
    |w: &Q4_0| { (w.d, _mm256_sub_epi8(nibbles(&w.qs), _mm256_set1_epi8(8))) }
);
builds!(
    dot_q5_0_avx2,
    dot_q5_0_vnni,
    Q5_0,
    signed_rows,
    |w: &Q5_0| {
        let codes = _mm256_or_si256(nibbles(&w.qs), fifth_bits(w.qh));
        (w.d, _mm256_sub_epi8(codes, _mm256_set1_epi8(16)))
    }
);
builds!(
    dot_q4_1_avx2,
    dot_q4_1_vnni,
    Q4_1,
    affine_rows,
    |w: &Q4_1| { (w.dm, nibbles(&w.qs)) }
);
builds!(
    dot_q5_1_avx2,
    dot_q5_1_vnni,
    Q5_1,
    affine_rows,
    |w: &Q5_1| { (w.dm, _mm256_or_si256(nibbles(&w.qs), fifth_bits(w.qh))) }
);
