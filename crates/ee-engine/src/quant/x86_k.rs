//! AVX2 and AVX-512 (BW, VNNI) kernels of the K-quant formats
//! (`super::k_quants`, whose `dispatch` says which runs when). A
//! super-block's integer sum is accumulated in eight or sixteen i32 lanes
//! and reduced once; integer sums are exact and the float step is the
//! portable one, so every build gives the same bits.

use std::arch::x86_64::*;

use super::k_quants::{add_block, ActBlockK, Q4K, Q5K, Q6K};

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let quad = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(quad, _mm_shuffle_epi32(quad, 0b10_11_00_01)))
}

/// `Σ a·b` over sixteen i16 pairs (`bsums` against per-16 weights).
#[inline(always)]
unsafe fn dot_i16x16(a: &[i16; 16], b: &[i16; 16]) -> i32 {
    let a = _mm256_loadu_si256(a.as_ptr().cast());
    let b = _mm256_loadu_si256(b.as_ptr().cast());
    hsum_i32(_mm256_madd_epi16(a, b))
}

/// The first 32 bytes of `bytes` (panics if there are fewer).
#[inline(always)]
unsafe fn load(bytes: &[u8]) -> __m256i {
    let bytes: &[u8; 32] = bytes[..32].try_into().expect("32 bytes");
    _mm256_loadu_si256(bytes.as_ptr().cast())
}

/// Adds `scale · Σ(w·x)` pairwise into i32 lanes: unsigned codes `w` times
/// signed activations, pairs to i16 (at most 2·63·128, no saturation), then
/// pairs times the i16 scales to i32.
#[inline(always)]
unsafe fn scaled_dot(acc: __m256i, w: __m256i, x: &[i8], scale: __m256i) -> __m256i {
    let x: &[i8; 32] = x[..32].try_into().expect("32 activations");
    let x = _mm256_loadu_si256(x.as_ptr().cast());
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), scale))
}

/// Dot products of one Q4_K/Q5_K weight row with `N` activation rows.
/// `codes(w, c)` gives chunk `c`'s two sub-blocks of unsigned codes (values
/// `64c..64c+32` and `64c+32..64c+64`), unpacked once for all rows.
#[inline(always)]
unsafe fn four_five_rows<W, const N: usize>(
    w: &[W],
    a: [&[ActBlockK]; N],
    parts: impl Fn(&W) -> (f32, f32, &[i16; 8], &[i16; 16]),
    codes: impl Fn(&W, usize) -> (__m256i, __m256i),
) -> [f32; N] {
    assert!(a.iter().all(|a| a.len() >= w.len()));
    let mut out = [0f32; N];
    for (b, w) in w.iter().enumerate() {
        let (d, dmin, sc, m) = parts(w);
        let mut acc = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            let (low, high) = codes(w, c);
            let (s_low, s_high) = (
                _mm256_set1_epi16(sc[2 * c]),
                _mm256_set1_epi16(sc[2 * c + 1]),
            );
            for (acc, a) in acc.iter_mut().zip(&a) {
                // SAFETY: b < w.len() <= a.len(), checked above.
                let x = &a.get_unchecked(b).q;
                *acc = scaled_dot(*acc, low, &x[64 * c..], s_low);
                *acc = scaled_dot(*acc, high, &x[64 * c + 32..], s_high);
            }
        }
        for ((out, acc), a) in out.iter_mut().zip(acc).zip(&a) {
            let x = a.get_unchecked(b);
            let im = dot_i16x16(m, &x.bsums);
            *out = add_block(*out, (d, dmin), x.d, hsum_i32(acc), im);
        }
    }
    out
}

/// Q4_K chunk `c`'s codes: sub-block `2c` (low nibbles), then `2c + 1`.
// Not `inline(always)`: its closures must inherit the features.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_k_codes(w: &Q4K, c: usize) -> (__m256i, __m256i) {
    let mask = _mm256_set1_epi8(0x0F);
    let q = load(&w.qs[32 * c..]);
    (
        _mm256_and_si256(q, mask),
        _mm256_and_si256(_mm256_srli_epi16(q, 4), mask),
    )
}

/// Q5_K chunk `c`'s codes: [`q4_k_codes`] with 16 added where the fifth
/// bit (`qh` bit `2c`, then `2c + 1`) is set.
// Not `inline(always)`: its closures must inherit the features.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn q5_k_codes(w: &Q5K, c: usize) -> (__m256i, __m256i) {
    let (mask, sixteen) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(16));
    let (q, qh) = (load(&w.qs[32 * c..]), load(&w.qh));
    let fifth = |j: usize| {
        let bit = _mm256_set1_epi8(1 << j);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
        _mm256_and_si256(set, sixteen)
    };
    (
        _mm256_or_si256(_mm256_and_si256(q, mask), fifth(2 * c)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(q, 4), mask),
            fifth(2 * c + 1),
        ),
    )
}

fn q4_k_parts(w: &Q4K) -> (f32, f32, &[i16; 8], &[i16; 16]) {
    (w.d, w.dmin, &w.sc, &w.m)
}

fn q5_k_parts(w: &Q5K) -> (f32, f32, &[i16; 8], &[i16; 16]) {
    (w.d, w.dmin, &w.sc, &w.m)
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_q4_k_avx2<const N: usize>(w: &[Q4K], a: [&[ActBlockK]; N]) -> [f32; N] {
    four_five_rows(w, a, q4_k_parts, |w, c| q4_k_codes(w, c))
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_q5_k_avx2<const N: usize>(w: &[Q5K], a: [&[ActBlockK]; N]) -> [f32; N] {
    four_five_rows(w, a, q5_k_parts, |w, c| q5_k_codes(w, c))
}

/// # Safety
/// The CPU must have AVX-512 F, BW and VNNI, AVX2 and FMA.
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn dot_q5_k_avx512<const N: usize>(w: &[Q5K], a: [&[ActBlockK]; N]) -> [f32; N] {
    four_five_rows_512(w, a, q5_k_parts, |w, c| q5_k_codes(w, c))
}

/// Q6_K half `n`'s codes, quarter by quarter (values `128n + 32q ..`),
/// and each quarter's scales: one per i16 half, as each 32-value quarter
/// spans two sub-blocks of 16.
// Not `inline(always)`: its closures must inherit the features.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn q6_k_codes(w: &Q6K, n: usize) -> [(__m256i, __m256i); 4] {
    let (low4, low2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let (ql0, ql1, qh) = (
        load(&w.ql[64 * n..]),
        load(&w.ql[64 * n + 32..]),
        load(&w.qh[32 * n..]),
    );
    std::array::from_fn(|quarter| {
        let ql = if quarter % 2 == 0 { ql0 } else { ql1 };
        let ql = if quarter < 2 {
            ql
        } else {
            _mm256_srli_epi16(ql, 4)
        };
        let high = match quarter {
            0 => qh,
            1 => _mm256_srli_epi16(qh, 2),
            2 => _mm256_srli_epi16(qh, 4),
            _ => _mm256_srli_epi16(qh, 6),
        };
        let code = _mm256_or_si256(
            _mm256_and_si256(ql, low4),
            _mm256_slli_epi16(_mm256_and_si256(high, low2), 4),
        );
        let k = 8 * n + 2 * quarter;
        let scale = _mm256_set_m128i(_mm_set1_epi16(w.sc[k + 1]), _mm_set1_epi16(w.sc[k]));
        (code, scale)
    })
}

/// The float step of a Q6_K block: its offset of 32 out, as
/// `q6_k_offset` computes it.
#[inline(always)]
unsafe fn q6_k_block(out: f32, w: &Q6K, x: &ActBlockK, iq: i32) -> f32 {
    add_block(
        out,
        (w.d, 0.0),
        x.d,
        iq - 32 * dot_i16x16(&w.sc, &x.bsums),
        0,
    )
}

/// Dot products of one Q6_K weight row with `N` activation rows.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dot_q6_k_avx2<const N: usize>(w: &[Q6K], a: [&[ActBlockK]; N]) -> [f32; N] {
    assert!(a.iter().all(|a| a.len() >= w.len()));
    let mut out = [0f32; N];
    for (b, w) in w.iter().enumerate() {
        let mut acc = [_mm256_setzero_si256(); N];
        for n in 0..2 {
            for (quarter, (code, scale)) in q6_k_codes(w, n).into_iter().enumerate() {
                for (acc, a) in acc.iter_mut().zip(&a) {
                    // SAFETY: b < w.len() <= a.len(), checked above.
                    let x = &a.get_unchecked(b).q;
                    *acc = scaled_dot(*acc, code, &x[128 * n + 32 * quarter..], scale);
                }
            }
        }
        for ((out, acc), a) in out.iter_mut().zip(acc).zip(&a) {
            *out = q6_k_block(*out, w, a.get_unchecked(b), hsum_i32(acc));
        }
    }
    out
}

/// [`dot_q6_k_avx2`] with two quarters in one register.
///
/// # Safety
/// As [`dot_q5_k_avx512`].
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
pub(super) unsafe fn dot_q6_k_avx512<const N: usize>(w: &[Q6K], a: [&[ActBlockK]; N]) -> [f32; N] {
    assert!(a.iter().all(|a| a.len() >= w.len()));
    let mut out = [0f32; N];
    for (b, w) in w.iter().enumerate() {
        let mut acc = [_mm512_setzero_si512(); N];
        for n in 0..2 {
            let q = q6_k_codes(w, n);
            for pair in 0..2 {
                let (first, second) = (q[2 * pair], q[2 * pair + 1]);
                let (code, scale) = (join(first.0, second.0), join(first.1, second.1));
                for (acc, a) in acc.iter_mut().zip(&a) {
                    // SAFETY: b < w.len() <= a.len(), checked above.
                    let x = &a.get_unchecked(b).q;
                    *acc = scaled_dot_512(*acc, code, &x[128 * n + 64 * pair..], scale);
                }
            }
        }
        for ((out, acc), a) in out.iter_mut().zip(acc).zip(&a) {
            *out = q6_k_block(*out, w, a.get_unchecked(b), _mm512_reduce_add_epi32(acc));
        }
    }
    out
}

/// Two 32-byte halves as one 512-bit register, `low` first.
#[inline(always)]
unsafe fn join(low: __m256i, high: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
}

/// [`scaled_dot`] on 64 values at once, the i16 pairs times the scales
/// added into i32 lanes in one VNNI instruction (`vpdpwssd`).
#[inline(always)]
unsafe fn scaled_dot_512(acc: __m512i, w: __m512i, x: &[i8], scale: __m512i) -> __m512i {
    let x: &[i8; 64] = x[..64].try_into().expect("64 activations");
    let x = _mm512_loadu_si512(x.as_ptr().cast());
    _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(w, x), scale)
}

/// [`four_five_rows`] with chunk `c`'s two sub-blocks in one register.
#[inline(always)]
unsafe fn four_five_rows_512<W, const N: usize>(
    w: &[W],
    a: [&[ActBlockK]; N],
    parts: impl Fn(&W) -> (f32, f32, &[i16; 8], &[i16; 16]),
    codes: impl Fn(&W, usize) -> (__m256i, __m256i),
) -> [f32; N] {
    assert!(a.iter().all(|a| a.len() >= w.len()));
    let mut out = [0f32; N];
    for (b, w) in w.iter().enumerate() {
        let (d, dmin, sc, m) = parts(w);
        let mut acc = [_mm512_setzero_si512(); N];
        for c in 0..4 {
            let (low, high) = codes(w, c);
            let scales = join(
                _mm256_set1_epi16(sc[2 * c]),
                _mm256_set1_epi16(sc[2 * c + 1]),
            );
            let both = join(low, high);
            for (acc, a) in acc.iter_mut().zip(&a) {
                // SAFETY: b < w.len() <= a.len(), checked above.
                let x = &a.get_unchecked(b).q;
                *acc = scaled_dot_512(*acc, both, &x[64 * c..], scales);
            }
        }
        for ((out, acc), a) in out.iter_mut().zip(acc).zip(&a) {
            let x = a.get_unchecked(b);
            let im = dot_i16x16(m, &x.bsums);
            *out = add_block(*out, (d, dmin), x.d, _mm512_reduce_add_epi32(acc), im);
        }
    }
    out
}
