//! The x86-64 SIMD kernels of the 32-value formats (`super::interleaved`):
//! AVX2, and AVX-512 VNNI where the CPU has it. Both compute the portable
//! definition exactly (the same integer sums, the same fused float steps in
//! the same order), so all builds agree bit for bit.

use std::arch::x86_64::*;

use super::interleaved::{Interleaved, GROUP};
use super::legacy::{quantize_block, ActBlock, LegacyFormat, BLOCK};

#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize_activations_avx2(x: &[f32]) -> Vec<ActBlock> {
    let mut blocks = Vec::with_capacity(x.len() / BLOCK);
    for block in x.chunks_exact(BLOCK) {
        blocks.push(quantize_block(block));
    }
    blocks
}

/// One group's outputs for `N` activation rows. Per block, the eight code
/// registers are loaded (and, for 4-bit formats, split into nibbles) once;
/// `prep` turns each into the pair `dot` takes, and `dot(acc, w, x)` adds
/// the byte products of register `w` with the broadcast activation bytes
/// `x`, four per i32 lane (one lane per weight row). `init` is the exact
/// integer offset term `−k·Σx`, or zero where `prep` already made the
/// codes signed.
#[inline(always)]
unsafe fn group_dots<F: LegacyFormat, const N: usize>(
    (d, m, codes): (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]),
    a: [&[ActBlock]; N],
    prep: impl Fn(__m256i) -> [__m256i; 2],
    dot: impl Fn(__m256i, [__m256i; 2], __m256i) -> __m256i,
    init: impl Fn(&ActBlock) -> __m256i,
) -> [[f32; GROUP]; N] {
    let code_bytes = Interleaved::<F>::CODE_BYTES;
    let nb = d.len();
    assert!(codes.len() >= nb * code_bytes && a.iter().all(|a| a.len() >= nb));
    assert!(!F::AFFINE || m.len() >= nb);
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let block = codes.as_ptr().add(b * code_bytes);
        let load = |j: usize| _mm256_loadu_si256(block.add(32 * j).cast());
        let w: [__m256i; 8] = if F::NIBBLES {
            let packed: [__m256i; 4] = std::array::from_fn(load);
            std::array::from_fn(|j| {
                let v = packed[j % 4];
                if j < 4 {
                    _mm256_and_si256(v, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low)
                }
            })
        } else {
            std::array::from_fn(load)
        };
        let w = w.map(&prep);
        // SAFETY (every `get_unchecked`): b < nb <= each slice's length.
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.get_unchecked(b).as_ptr().cast()));
        let mw = if F::AFFINE {
            _mm256_cvtph_ps(_mm_loadu_si128(m.get_unchecked(b).as_ptr().cast()))
        } else {
            _mm256_setzero_ps()
        };
        for (acc, a) in acc.iter_mut().zip(&a) {
            let x = a.get_unchecked(b);
            let q = x.q.as_ptr().cast::<i32>();
            let mut isum = init(x);
            for (j, &w) in w.iter().enumerate() {
                isum = dot(isum, w, _mm256_set1_epi32(q.add(j).read_unaligned()));
            }
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d));
            *acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), *acc);
            if F::AFFINE {
                *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s), *acc);
            }
        }
    }
    acc.map(|v| {
        let mut out = [0f32; GROUP];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    })
}

/// `−k·Σx` in every lane.
#[inline(always)]
unsafe fn offset<F: LegacyFormat>(x: &ActBlock) -> __m256i {
    _mm256_set1_epi32(-F::OFFSET * x.sum)
}

/// VNNI: unsigned codes (Q8_0's stored as `q + 128`) straight into
/// `vpdpbusd`, which sums in i32 without saturating.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(super) unsafe fn group_dots_vnni<F: LegacyFormat, const N: usize>(
    group: (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]),
    a: [&[ActBlock]; N],
) -> [[f32; GROUP]; N] {
    group_dots::<F, N>(
        group,
        a,
        |w| [w, w],
        |acc, [w, _], x| _mm256_dpbusd_epi32(acc, w, x),
        |x| offset::<F>(x),
    )
}

/// AVX2: byte products pairwise to i16, then to i32. Codes of at most 31
/// cannot saturate the i16 pairs (2·31·128); Q8_0's `q + 128` could, so its
/// codes are made signed again and their signs moved onto the activations
/// (ggml's trick), which needs no offset.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_dots_avx2<F: LegacyFormat, const N: usize>(
    group: (&[[u16; GROUP]], &[[u16; GROUP]], &[u8]),
    a: [&[ActBlock]; N],
) -> [[f32; GROUP]; N] {
    let ones = _mm256_set1_epi16(1);
    let pairs =
        |acc, w, x| _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
    if F::OFFSET == 128 {
        let flip = _mm256_set1_epi8(-128);
        group_dots::<F, N>(
            group,
            a,
            |w| {
                let signed = _mm256_xor_si256(w, flip);
                [_mm256_abs_epi8(signed), signed]
            },
            |acc, [w_abs, signed], x| pairs(acc, w_abs, _mm256_sign_epi8(x, signed)),
            |_| _mm256_setzero_si256(),
        )
    } else {
        group_dots::<F, N>(
            group,
            a,
            |w| [w, w],
            |acc, [w, _], x| pairs(acc, w, x),
            |x| offset::<F>(x),
        )
    }
}
