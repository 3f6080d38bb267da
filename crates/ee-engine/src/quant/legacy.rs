//! ggml's 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and their
//! 8-bit activation blocks, with the portable dot products that the SIMD
//! kernels in `x86` reproduce.
//!
//! Layouts follow ggml (`ggml-common.h`): in a 4- or 5-bit block value `j`
//! is the low nibble of byte `j` and value `j + 16` its high nibble; a 5-bit
//! block's fifth bits are one little-endian `u32`, bit `j` for value `j`.

use super::{Isa, WeightBlock};

pub(crate) const BLOCK: usize = 32;

/// One activation block quantized to 8 bits: `x ≈ d * q`, with `s = d * Σq`.
#[derive(Clone, Copy)]
pub(crate) struct ActBlock {
    pub d: f32,
    pub s: f32,
    pub q: [i8; BLOCK],
}

/// Quantizes activation rows block by block, with the AVX2 build of the
/// same code when the CPU has it (results are identical: `round` compiles to
/// an exact instruction sequence instead of a libm call).
pub(crate) fn quantize_activations(x: &[f32]) -> Vec<ActBlock> {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { super::x86::quantize_activations_avx2(x) };
    }
    x.chunks_exact(BLOCK).map(quantize_block).collect()
}

/// 8-bit activation quantization exactly as candle does it (ggml's Q8_1;
/// Q8_0 is the same without the sum), scales rounded through f16, so our
/// logits match the reference implementation.
#[inline(always)]
pub(crate) fn quantize_block(x: &[f32]) -> ActBlock {
    // Eight independent maxima (max is exact in any order) so it vectorizes.
    let mut lanes = [0f32; 8];
    for chunk in x.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = (v * inv).round() as i8;
        sum += i32::from(*qi);
    }
    let d = f16(d);
    ActBlock {
        d,
        s: f16(f16(sum as f32) * d),
        q,
    }
}

fn f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

fn read_f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q4_0: `w = d * (q - 8)`, `q` 4-bit.
pub(crate) struct Q4_0 {
    pub d: f32,
    pub qs: [u8; 16],
}

/// Q4_1: `w = d * q + m`, `q` 4-bit.
pub(crate) struct Q4_1 {
    pub dm: [f32; 2],
    pub qs: [u8; 16],
}

/// Q5_0: `w = d * (q - 16)`, `q` 5-bit (fifth bits in `qh`).
pub(crate) struct Q5_0 {
    pub d: f32,
    pub qh: u32,
    pub qs: [u8; 16],
}

/// Q5_1: `w = d * q + m`, `q` 5-bit.
pub(crate) struct Q5_1 {
    pub dm: [f32; 2],
    pub qh: u32,
    pub qs: [u8; 16],
}

/// Q8_0: `w = d * q`, `q` signed 8-bit.
pub(crate) struct Q8_0 {
    pub d: f32,
    pub qs: [i8; BLOCK],
}

/// Block `b`'s value `j` as an unsigned code (before any offset).
fn nibble(qs: &[u8; 16], j: usize) -> i32 {
    i32::from(if j < 16 {
        qs[j] & 0x0F
    } else {
        qs[j - 16] >> 4
    })
}

fn fifth_bit(qh: u32, j: usize) -> i32 {
    (((qh >> j) & 1) << 4) as i32
}

/// `Σ code(j) * a.q[j]` over a block.
fn isum(a: &ActBlock, code: impl Fn(usize) -> i32) -> i32 {
    (0..BLOCK).map(|j| code(j) * i32::from(a.q[j])).sum()
}

/// Σ over blocks of `term(w, a)`, in block order.
fn scalar_dot<W, const N: usize>(
    w: &[W],
    a: [&[ActBlock]; N],
    term: impl Fn(&W, &ActBlock) -> f32,
) -> [f32; N] {
    a.map(|a| w.iter().zip(a).fold(0f32, |acc, (w, a)| acc + term(w, a)))
}

/// Each format's SIMD builds, chosen by `isa`; the portable sum otherwise.
macro_rules! dispatch {
    ($isa:expr, $w:expr, $a:expr, $vnni:ident, $avx2:ident, $portable:expr) => {
        // SAFETY: `isa` names instructions the CPU reports (see `Isa::detect`).
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => unsafe { super::x86::$vnni($w, $a) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { super::x86::$avx2($w, $a) },
            Isa::Portable => $portable,
        }
    };
}

impl WeightBlock for Q4_0 {
    const NAME: &'static str = "Q4_0";
    const BYTES: usize = 18;
    type Act = ActBlock;
    fn unpack(b: &[u8]) -> Self {
        Self {
            d: read_f16(b),
            qs: std::array::from_fn(|i| b[2 + i]),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlock]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q4_0_vnni, dot_q4_0_avx2, {
            scalar_dot(w, a, |w, a| {
                w.d * a.d * isum(a, |j| nibble(&w.qs, j) - 8) as f32
            })
        })
    }
}

impl WeightBlock for Q4_1 {
    const NAME: &'static str = "Q4_1";
    const BYTES: usize = 20;
    type Act = ActBlock;
    fn unpack(b: &[u8]) -> Self {
        Self {
            dm: [read_f16(b), read_f16(&b[2..])],
            qs: std::array::from_fn(|i| b[4 + i]),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlock]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q4_1_vnni, dot_q4_1_avx2, {
            scalar_dot(w, a, |w, a| {
                w.dm[0] * a.d * isum(a, |j| nibble(&w.qs, j)) as f32 + w.dm[1] * a.s
            })
        })
    }
}

impl WeightBlock for Q5_0 {
    const NAME: &'static str = "Q5_0";
    const BYTES: usize = 22;
    type Act = ActBlock;
    fn unpack(b: &[u8]) -> Self {
        Self {
            d: read_f16(b),
            qh: u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            qs: std::array::from_fn(|i| b[6 + i]),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlock]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q5_0_vnni, dot_q5_0_avx2, {
            scalar_dot(w, a, |w, a| {
                let code = |j| (nibble(&w.qs, j) | fifth_bit(w.qh, j)) - 16;
                w.d * a.d * isum(a, code) as f32
            })
        })
    }
}

impl WeightBlock for Q5_1 {
    const NAME: &'static str = "Q5_1";
    const BYTES: usize = 24;
    type Act = ActBlock;
    fn unpack(b: &[u8]) -> Self {
        Self {
            dm: [read_f16(b), read_f16(&b[2..])],
            qh: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            qs: std::array::from_fn(|i| b[8 + i]),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlock]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q5_1_vnni, dot_q5_1_avx2, {
            scalar_dot(w, a, |w, a| {
                let code = |j| nibble(&w.qs, j) | fifth_bit(w.qh, j);
                w.dm[0] * a.d * isum(a, code) as f32 + w.dm[1] * a.s
            })
        })
    }
}

impl WeightBlock for Q8_0 {
    const NAME: &'static str = "Q8_0";
    const BYTES: usize = 34;
    type Act = ActBlock;
    fn unpack(b: &[u8]) -> Self {
        Self {
            d: read_f16(b),
            qs: std::array::from_fn(|i| b[2 + i] as i8),
        }
    }
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlock]; N], isa: Isa) -> [f32; N] {
        dispatch!(isa, w, a, dot_q8_0_vnni, dot_q8_0_avx2, {
            scalar_dot(w, a, |w, a| {
                w.d * a.d * isum(a, |j| i32::from(w.qs[j])) as f32
            })
        })
    }
}
