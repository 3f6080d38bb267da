//! The x86-64 SIMD kernels of the 32-value formats (`super::interleaved`):
//! AVX2, and AVX-512 VNNI where the CPU has it. Both compute the portable
//! definition exactly (the same integer sums, the same fused float steps in
//! the same order), so all builds agree bit for bit.

use std::arch::x86_64::*;

use super::interleaved::{Interleaved, GROUP};
use super::legacy::{ActBlock, LegacyFormat};

/// Eight activation codes from `q[8t..]`, as one little-endian `i64`.
#[inline(always)]
fn eight_codes(x: &ActBlock, t: usize) -> i64 {
    let bytes: [i8; 8] = std::array::from_fn(|i| x.q[8 * t + i]);
    i64::from_le_bytes(bytes.map(|b| b as u8))
}

/// The f16 `d` (or `m`) of eight rows, widened.
#[inline(always)]
unsafe fn widen8(v: &[u16; GROUP]) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().cast()))
}

/// The float step shared by both builds: `acc = fma(d·d_x, isum, acc)`,
/// then `acc = fma(m, s_x, acc)` for formats with a min.
#[inline(always)]
unsafe fn scale_step<F: LegacyFormat>(
    acc: __m256,
    isum: __m256i,
    dw: __m256,
    mw: __m256,
    x: &ActBlock,
) -> __m256 {
    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d));
    let acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc);
    if F::AFFINE {
        _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s), acc)
    } else {
        acc
    }
}

/// `−k·Σx` for every row.
#[inline(always)]
unsafe fn offset<F: LegacyFormat>(x: &ActBlock) -> __m256i {
    _mm256_set1_epi32(-F::OFFSET * x.sum)
}

/// The bounds that every unchecked read in the kernels below relies on:
/// `nb` blocks of codes, scales and activations.
fn check<F: LegacyFormat, const N: usize>(
    (d, m, codes): (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]),
    a: &[&[ActBlock]; N],
) {
    let nb = d.len();
    assert!(codes.len() >= nb * Interleaved::<F>::CODE_BYTES && a.iter().all(|a| a.len() >= nb));
    assert!(!F::AFFINE || m.len() >= nb);
}

/// VNNI, 512-bit: one register holds eight codes of each of the eight
/// rows, and `vpdpbusd` multiplies it by eight activation codes broadcast
/// to every row, summing in i32 without saturating (Q8_0's codes are stored
/// as `q + 128`; the offset term takes that back out). Each row's two i32
/// lanes are added when the block is done.
///
/// # Safety
/// The CPU must have every feature enabled here.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn group_dots_vnni<F: LegacyFormat, const N: usize>(
    group: (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]),
    a: [&[ActBlock]; N],
) -> [[f32; GROUP]; N] {
    check::<F, N>(group, &a);
    let (d, m, codes) = group;
    let code_bytes = Interleaved::<F>::CODE_BYTES;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..d.len() {
        // SAFETY: b < nb, and `check` makes codes hold nb blocks of
        // `code_bytes` (= 64 × the chunks read).
        let block = codes.as_ptr().add(b * code_bytes);
        let load = |t: usize| _mm512_loadu_si512(block.add(64 * t).cast());
        // w[t]: values 8t..8t + 8 of every row.
        let w: [__m512i; 4] = if F::NIBBLES {
            let (p0, p1) = (load(0), load(1));
            let high = |v| _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            [
                _mm512_and_si512(p0, low),
                _mm512_and_si512(p1, low),
                high(p0),
                high(p1),
            ]
        } else {
            std::array::from_fn(load)
        };
        // SAFETY (every `get_unchecked`): b < nb <= each slice's length (`check`).
        let dw = widen8(d.get_unchecked(b));
        let mw = if F::AFFINE {
            widen8(m.get_unchecked(b))
        } else {
            _mm256_setzero_ps()
        };
        for (acc, a) in acc.iter_mut().zip(&a) {
            let x = a.get_unchecked(b);
            let mut lanes = _mm512_setzero_si512();
            for (t, &w) in w.iter().enumerate() {
                lanes = _mm512_dpbusd_epi32(lanes, w, _mm512_set1_epi64(eight_codes(x, t)));
            }
            // Row r's lanes are 2r and 2r + 1: add them in each 64-bit lane
            // and keep the low halves.
            let rows = _mm512_cvtepi64_epi32(_mm512_add_epi32(lanes, _mm512_srli_epi64(lanes, 32)));
            let isum = _mm256_add_epi32(rows, offset::<F>(x));
            *acc = scale_step::<F>(*acc, isum, dw, mw, x);
        }
    }
    acc.map(|v| {
        let mut out = [0f32; GROUP];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    })
}

/// AVX2: each 64-byte chunk as two registers of four rows. Byte products
/// go pairwise to i16, then to i32. Codes of at most 31 cannot saturate the
/// i16 pairs (2·31·128); Q8_0's `q + 128` could, so its codes are made
/// signed again and their signs moved onto the activations (ggml's trick),
/// which needs no offset.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_dots_avx2<F: LegacyFormat, const N: usize>(
    group: (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]),
    a: [&[ActBlock]; N],
) -> [[f32; GROUP]; N] {
    check::<F, N>(group, &a);
    let (d, m, codes) = group;
    let code_bytes = Interleaved::<F>::CODE_BYTES;
    let signed = F::OFFSET == 128;
    let (low, ones, flip) = (
        _mm256_set1_epi8(0x0F),
        _mm256_set1_epi16(1),
        _mm256_set1_epi8(-128),
    );
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..d.len() {
        // SAFETY: as in `group_dots_vnni` (32 × the halves read).
        let block = codes.as_ptr().add(b * code_bytes);
        let load = |half: usize| _mm256_loadu_si256(block.add(32 * half).cast());
        // w[t][h]: values 8t..8t + 8 of rows 4h..4h + 4.
        let w: [[__m256i; 2]; 4] = if F::NIBBLES {
            let p: [__m256i; 4] = std::array::from_fn(load);
            let high = |v| _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            [
                [_mm256_and_si256(p[0], low), _mm256_and_si256(p[1], low)],
                [_mm256_and_si256(p[2], low), _mm256_and_si256(p[3], low)],
                [high(p[0]), high(p[1])],
                [high(p[2]), high(p[3])],
            ]
        } else {
            std::array::from_fn(|t| [load(2 * t), load(2 * t + 1)])
        };
        // Q8_0: |q| as the unsigned factor, q's signs for the activations.
        let w = w.map(|pair| {
            pair.map(|v| {
                if signed {
                    let q = _mm256_xor_si256(v, flip);
                    [_mm256_abs_epi8(q), q]
                } else {
                    [v, v]
                }
            })
        });
        // SAFETY (every `get_unchecked`): b < nb <= each slice's length (`check`).
        let dw = widen8(d.get_unchecked(b));
        let mw = if F::AFFINE {
            widen8(m.get_unchecked(b))
        } else {
            _mm256_setzero_ps()
        };
        for (acc, a) in acc.iter_mut().zip(&a) {
            let x = a.get_unchecked(b);
            let mut halves = [_mm256_setzero_si256(); 2];
            for (t, pair) in w.iter().enumerate() {
                let xb = _mm256_set1_epi64x(eight_codes(x, t));
                for (sum, [u, s]) in halves.iter_mut().zip(pair) {
                    let xs = if signed { _mm256_sign_epi8(xb, *s) } else { xb };
                    let pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(*u, xs), ones);
                    *sum = _mm256_add_epi32(*sum, pairs);
                }
            }
            // Lanes (2r, 2r + 1) per row: add them, rows back in order.
            let rows =
                _mm256_permute4x64_epi64(_mm256_hadd_epi32(halves[0], halves[1]), 0b11_01_10_00);
            let isum = if signed {
                rows
            } else {
                _mm256_add_epi32(rows, offset::<F>(x))
            };
            *acc = scale_step::<F>(*acc, isum, dw, mw, x);
        }
    }
    acc.map(|v| {
        let mut out = [0f32; GROUP];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    })
}
