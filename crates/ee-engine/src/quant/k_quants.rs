//! ggml's K-quant formats (Q4_K, Q5_K, Q6_K): 256-value super-blocks with
//! 6- or 8-bit sub-block scales, dotted with activations quantized to Q8_K.
//!
//! Layouts follow ggml (`ggml-common.h`, `dequantize_row_q*_K`). Scales are
//! unpacked to i16 at load. Every kernel sums a super-block in integers and
//! then applies its float scales in one fixed scalar expression
//! ([`add_block`]), so the portable and SIMD builds give identical bits.

use super::{Isa, WeightBlock};

pub(crate) const QK_K: usize = 256;

/// 256 activations quantized to 8 bits as candle's `BlockQ8K` (ggml's Q8_K):
/// `x ≈ d * q`, with the sums of each 16 codes.
#[derive(Clone, Copy)]
pub(crate) struct ActBlockK {
    pub d: f32,
    pub q: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

/// Quantizes activation rows to Q8_K blocks.
pub(crate) fn quantize_activations_k(x: &[f32]) -> Vec<ActBlockK> {
    super::map_blocks(x, QK_K, quantize_block_k)
}

/// As candle's `BlockQ8K::from_float`: the scale maps the value of largest
/// magnitude to -128. Where a positive and a negative value tie for it,
/// candle takes the first; this takes the negative one, so that the order
/// of the block's values (which a hidden-tier key moves) never matters.
#[inline(always)]
pub(crate) fn quantize_block_k(x: &[f32]) -> ActBlockK {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() || (amax == v.abs() && v < max) {
            amax = v.abs();
            max = v;
        }
    }
    let mut block = ActBlockK {
        d: 0.0,
        q: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    if amax == 0.0 {
        return block;
    }
    let iscale = -128f32 / max;
    for (q, &v) in block.q.iter_mut().zip(x) {
        *q = super::round_to_i8((iscale * v).min(127.0));
    }
    for (sum, q) in block.bsums.iter_mut().zip(block.q.chunks_exact(16)) {
        *sum = q.iter().map(|&q| i16::from(q)).sum();
    }
    block.d = 1.0 / iscale;
    block
}

/// `acc + d_w·d_a·iq − dmin_w·d_a·im`, the float step shared by every build.
#[inline(always)]
pub(crate) fn add_block(acc: f32, (d, dmin): (f32, f32), d_a: f32, iq: i32, im: i32) -> f32 {
    acc + (d * d_a) * iq as f32 - (dmin * d_a) * im as f32
}

/// Q4_K: `w = d·sc[j]·q − dmin·m[j]` for 4-bit `q` in eight sub-blocks of
/// 32. `qs` byte `32c + l` holds value `64c + l` (low nibble, sub-block 2c)
/// and `64c + 32 + l` (high nibble, sub-block 2c + 1).
pub(crate) struct Q4K {
    pub d: f32,
    pub dmin: f32,
    /// Sub-block scales.
    pub sc: [i16; 8],
    /// Sub-block mins, each twice: they multiply `bsums` pairwise.
    pub m: [i16; 16],
    pub qs: [u8; 128],
}

/// Q5_K: as Q4_K with a fifth bit per value: `qh[l]` bit `j` is the fifth
/// bit of sub-block `j`'s value `l`.
pub(crate) struct Q5K {
    pub d: f32,
    pub dmin: f32,
    pub sc: [i16; 8],
    pub m: [i16; 16],
    pub qh: [u8; 32],
    pub qs: [u8; 128],
}

/// Q6_K: `w = d·sc[k]·(q − 32)` for 6-bit `q` in sixteen sub-blocks of 16.
/// In half `n` (128 values), value `l`, `l + 32`, `l + 64`, `l + 96` take
/// the low nibble of `ql[64n + l]`, of `ql[64n + 32 + l]`, their high
/// nibbles, and bits 0–1, 2–3, 4–5, 6–7 of `qh[32n + l]` as the top two.
pub(crate) struct Q6K {
    pub d: f32,
    pub sc: [i16; 16],
    pub ql: [u8; 128],
    pub qh: [u8; 64],
}

fn read_f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// The eight 6-bit scales and mins packed in 12 bytes (ggml's
/// `get_scale_min_k4`); the mins come back twice each.
fn scales_and_mins(s: &[u8]) -> ([i16; 8], [i16; 16]) {
    let mut sc = [0i16; 8];
    let mut m = [0i16; 16];
    for j in 0..8 {
        let (scale, min) = if j < 4 {
            (s[j] & 63, s[j + 4] & 63)
        } else {
            (
                (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
                (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
            )
        };
        sc[j] = i16::from(scale);
        m[2 * j] = i16::from(min);
        m[2 * j + 1] = i16::from(min);
    }
    (sc, m)
}

/// `Σ m·bsums` of a Q4_K/Q5_K block against an activation block.
fn min_sum(m: &[i16; 16], a: &ActBlockK) -> i32 {
    m.iter()
        .zip(&a.bsums)
        .map(|(&m, &s)| i32::from(m) * i32::from(s))
        .sum()
}

/// `Σ sc[j]·Σ(q·x)` over the eight 32-value sub-blocks, `code(i)` being
/// value `i`'s unsigned code.
fn sub_block_sum(sc: &[i16; 8], a: &ActBlockK, code: impl Fn(usize) -> i32) -> i32 {
    (0..8)
        .map(|j| {
            let s: i32 = (32 * j..32 * j + 32)
                .map(|i| code(i) * i32::from(a.q[i]))
                .sum();
            i32::from(sc[j]) * s
        })
        .sum()
}

/// Value `i`'s 4-bit code in a Q4_K/Q5_K `qs`.
fn k_nibble(qs: &[u8; 128], i: usize) -> i32 {
    let (c, j) = (i / 64, i % 64);
    let b = qs[32 * c + j % 32];
    i32::from(if j < 32 { b & 0x0F } else { b >> 4 })
}

/// The portable dot products: one weight row against `N` activation rows.
fn scalar_dot<W, const N: usize>(
    w: &[W],
    a: [&[ActBlockK]; N],
    block: impl Fn(f32, &W, &ActBlockK) -> f32,
) -> [f32; N] {
    a.map(|a| w.iter().zip(a).fold(0f32, |acc, (w, a)| block(acc, w, a)))
}

/// The AVX2 build on x86 CPUs that have it, and the AVX-512 build, where
/// a format has one, for eight activation rows on CPUs with AVX-512 VNNI;
/// the portable sum otherwise.
///
/// The 512-bit builds join two 256-bit halves of codes and scales per 64
/// values and reduce sixteen lanes per block: only eight rows amortize
/// that. On the 2-core AVX-512 Xeon of the README's benchmarks, one thread,
/// 4096 x 4096 weights (GMAC/s, AVX2 against AVX-512, for 1 / 4 / 8 rows):
/// Q4_K 31.4/55.6/56.4 against 25.4/52.8/51.1, Q5_K 24.5/49.6/47.7 against
/// 21.0/42.1/54.2, Q6_K 20.6/44.6/44.8 against 16.9/39.5/51.8. So Q4_K
/// has no 512-bit build, and the others use theirs for eight rows only.
macro_rules! dispatch {
    ($isa:expr, $w:expr, $a:expr, $avx2:ident $(and $avx512:ident for eight rows)?, $portable:expr) => {
        match $isa {
            // SAFETY: each ISA names what the CPU has (see `Isa::detect`:
            // AVX-512 F, BW, VL and VNNI, with AVX2 and FMA; AVX2 and FMA).
            $(
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512Vnni if N == 8 => unsafe { super::x86_k::$avx512($w, $a) },
            )?
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni | Isa::Avx2 => unsafe { super::x86_k::$avx2($w, $a) },
            Isa::Portable => $portable,
        }
    };
}

impl WeightBlock for Q4K {
    const NAME: &'static str = "Q4_K";
    const BYTES: usize = 144;
    fn unpack(b: &[u8]) -> Self {
        let (sc, m) = scales_and_mins(&b[4..16]);
        Self {
            d: read_f16(b),
            dmin: read_f16(&b[2..]),
            sc,
            m,
            qs: std::array::from_fn(|i| b[16 + i]),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlockK]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q4_k_avx2, {
            scalar_dot(w, a, |acc, w, a| {
                let iq = sub_block_sum(&w.sc, a, |i| k_nibble(&w.qs, i));
                add_block(acc, (w.d, w.dmin), a.d, iq, min_sum(&w.m, a))
            })
        })
    }
}

impl WeightBlock for Q5K {
    const NAME: &'static str = "Q5_K";
    const BYTES: usize = 176;
    fn unpack(b: &[u8]) -> Self {
        let (sc, m) = scales_and_mins(&b[4..16]);
        Self {
            d: read_f16(b),
            dmin: read_f16(&b[2..]),
            sc,
            m,
            qh: std::array::from_fn(|i| b[16 + i]),
            qs: std::array::from_fn(|i| b[48 + i]),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlockK]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q5_k_avx2 and dot_q5_k_avx512 for eight rows, {
            scalar_dot(w, a, |acc, w, a| {
                let code = |i: usize| {
                    let high = (w.qh[i % 32] >> (i / 32)) & 1;
                    k_nibble(&w.qs, i) | (i32::from(high) << 4)
                };
                let iq = sub_block_sum(&w.sc, a, code);
                add_block(acc, (w.d, w.dmin), a.d, iq, min_sum(&w.m, a))
            })
        })
    }
}

/// `32·Σ sc[k]·bsums[k]`: Q6_K's offset of 32, taken out of its codes.
pub(crate) fn q6_k_offset(sc: &[i16; 16], a: &ActBlockK) -> i32 {
    32 * sc
        .iter()
        .zip(&a.bsums)
        .map(|(&s, &b)| i32::from(s) * i32::from(b))
        .sum::<i32>()
}

impl WeightBlock for Q6K {
    const NAME: &'static str = "Q6_K";
    const BYTES: usize = 210;
    fn unpack(b: &[u8]) -> Self {
        Self {
            ql: std::array::from_fn(|i| b[i]),
            qh: std::array::from_fn(|i| b[128 + i]),
            sc: std::array::from_fn(|i| i16::from(b[192 + i] as i8)),
            d: read_f16(&b[208..]),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlockK]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q6_k_avx2 and dot_q6_k_avx512 for eight rows, {
            scalar_dot(w, a, |acc, w, a| {
                let code = |i: usize| {
                    let (n, j) = (i / 128, i % 128);
                    let (quarter, l) = (j / 32, j % 32);
                    let low = w.ql[64 * n + 32 * (quarter % 2) + l] >> (4 * (quarter / 2)) & 0x0F;
                    let high = (w.qh[32 * n + l] >> (2 * quarter)) & 3;
                    i32::from(low | (high << 4))
                };
                let iq: i32 = (0..16)
                    .map(|k| {
                        let s: i32 = (16 * k..16 * k + 16)
                            .map(|i| code(i) * i32::from(a.q[i]))
                            .sum();
                        i32::from(w.sc[k]) * s
                    })
                    .sum();
                add_block(acc, (w.d, 0.0), a.d, iq - q6_k_offset(&w.sc, a), 0)
            })
        })
    }
}
