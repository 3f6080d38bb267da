//! Q4_1 and Q8_0 weight matmuls with runtime-detected SIMD kernels.
//!
//! In a portable build candle's CPU dot products for these formats are
//! scalar, and they hold nearly all of the default model's weights (Q4_1
//! layers, a Q8_0 embedding that doubles as the output head). These kernels
//! quantize each activation row to 8 bits once per matmul, exactly as candle
//! and llama.cpp do, and compute each output with AVX-512 VNNI or AVX2
//! integer dot products when the CPU has them, chosen at run time so builds
//! stay portable. Up to eight activation rows (a decode batch) share each
//! weight block as it is unpacked.
//!
//! Every activation row is computed on its own, in a fixed order, so a
//! sequence's outputs do not depend on what else is in the batch.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::linear::{by_weight_rows, cpu_matmul};
use crate::Error;

#[cfg(target_arch = "x86_64")]
mod x86;

const BLOCK: usize = 32;
/// On-disk Q4_1 block: f16 scale, f16 min, 16 bytes of 4-bit codes.
const Q4_1_BYTES: usize = 20;
/// On-disk Q8_0 block: f16 scale, 32 signed bytes.
const Q8_0_BYTES: usize = 34;

/// Weight blocks, scales unpacked to f32.
enum Blocks {
    /// Per block: (scale, min), and codes whose low nibbles are values 0..16
    /// and high nibbles values 16..32.
    Q4_1 {
        scales: Vec<[f32; 2]>,
        codes: Vec<[u8; 16]>,
    },
    Q8_0 {
        scales: Vec<f32>,
        codes: Vec<[i8; BLOCK]>,
    },
}

/// A quantized weight matrix `[rows, cols]` with our own kernels.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

/// One activation block quantized to 8 bits: `x ≈ d * q`, with `s = d * Σq`.
#[derive(Clone, Copy)]
struct ActBlock {
    d: f32,
    s: f32,
    q: [i8; BLOCK],
}

impl QuantMatrix {
    /// The weights' format, as ggml names it.
    pub fn format(&self) -> &'static str {
        match self.blocks {
            Blocks::Q4_1 { .. } => "Q4_1",
            Blocks::Q8_0 { .. } => "Q8_0",
        }
    }

    /// Whether these kernels handle a format.
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
    }

    /// Unpacks a Q4_1 or Q8_0 `QTensor` of shape `[rows, cols]`.
    pub fn from_qtensor(t: &QTensor) -> Result<Self, Error> {
        let (rows, cols) = t.shape().dims2()?;
        if cols % BLOCK != 0 {
            return Err(Error::Unsupported(format!(
                "{:?} rows of {cols} values",
                t.dtype()
            )));
        }
        let data = t.data()?;
        let n_blocks = rows * cols / BLOCK;
        let block_bytes = match t.dtype() {
            GgmlDType::Q4_1 => Q4_1_BYTES,
            GgmlDType::Q8_0 => Q8_0_BYTES,
            other => return Err(Error::Model(format!("no kernel for {other:?}"))),
        };
        if data.len() != n_blocks * block_bytes {
            return Err(Error::Model(format!(
                "{:?} tensor has {} bytes, expected {}",
                t.dtype(),
                data.len(),
                n_blocks * block_bytes
            )));
        }
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let blocks = data.chunks_exact(block_bytes);
        let blocks = if t.dtype() == GgmlDType::Q4_1 {
            Blocks::Q4_1 {
                scales: blocks
                    .clone()
                    .map(|b| [f16(&b[0..2]), f16(&b[2..4])])
                    .collect(),
                codes: blocks.map(|b| std::array::from_fn(|i| b[4 + i])).collect(),
            }
        } else {
            Blocks::Q8_0 {
                scales: blocks.clone().map(|b| f16(&b[0..2])).collect(),
                codes: blocks
                    .map(|b| std::array::from_fn(|i| b[2 + i] as i8))
                    .collect(),
            }
        };
        Ok(Self { rows, cols, blocks })
    }

    /// Output row `r` for `N` activation rows at once. Each result is
    /// bit-identical whatever `N` and whichever SIMD kernel (same integer
    /// sums, same float operations in the same order), so a row's outputs
    /// depend neither on how many rows share the call nor on the CPU.
    fn dot_rows<const N: usize>(&self, r: usize, a: [&[ActBlock]; N], isa: Isa) -> [f32; N] {
        let nb = self.cols / BLOCK;
        let a = a.map(|a| &a[..nb]);
        match &self.blocks {
            Blocks::Q4_1 { scales, codes } => {
                let (w_s, w_q) = (&scales[r * nb..][..nb], &codes[r * nb..][..nb]);
                // SAFETY: `isa` names instructions the CPU reports (see `Isa::detect`).
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni => unsafe { x86::dot_q4_1_vnni(w_s, w_q, a) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { x86::dot_q4_1_avx2(w_s, w_q, a) },
                    Isa::Portable => a.map(|a| dot_q4_1_scalar(w_s, w_q, a)),
                }
            }
            Blocks::Q8_0 { scales, codes } => {
                let (w_s, w_q) = (&scales[r * nb..][..nb], &codes[r * nb..][..nb]);
                // SAFETY: as above.
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Vnni => unsafe { x86::dot_q8_0_vnni(w_s, w_q, a) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { x86::dot_q8_0_avx2(w_s, w_q, a) },
                    Isa::Portable => a.map(|a| dot_q8_0_scalar(w_s, w_q, a)),
                }
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(x.apply_op1_no_bwd(self)?)
    }

    /// `x` `[m, cols]` times this matrix's transpose: `[m, rows]`. Each
    /// output is one row's dot product, computed the same way whatever `m`.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let acts = quantize_activations(x);
        let isa = Isa::detect();
        let act_row = |i: usize| &acts[i * nb..][..nb];
        by_weight_rows(self.rows, m, |rows, outputs| {
            // A tile of activation rows stays in cache while this task's
            // weight rows pass over it, rather than every weight row
            // streaming all of a long prompt's activations from memory.
            for tile in (0..m).step_by(ACTIVATION_TILE) {
                let end = (tile + ACTIVATION_TILE).min(m);
                for (r, out) in rows.clone().zip(outputs.chunks_exact_mut(m)) {
                    // Up to eight activation rows share each unpacked weight block.
                    let mut i = tile;
                    while i + 8 <= end {
                        let a: [&[ActBlock]; 8] = std::array::from_fn(|k| act_row(i + k));
                        out[i..i + 8].copy_from_slice(&self.dot_rows(r, a, isa));
                        i += 8;
                    }
                    if i + 4 <= end {
                        let a: [&[ActBlock]; 4] = std::array::from_fn(|k| act_row(i + k));
                        out[i..i + 4].copy_from_slice(&self.dot_rows(r, a, isa));
                        i += 4;
                    }
                    for (i, o) in out[..end].iter_mut().enumerate().skip(i) {
                        *o = self.dot_rows(r, [act_row(i)], isa)[0];
                    }
                }
            }
        })
    }
}

/// Activation rows per cache tile of a matmul (a multiple of 8, so the
/// eight-row groups are the same as without tiling): 256 rows of 1536
/// columns are about 480 KB of quantized blocks, within a core's L2.
const ACTIVATION_TILE: usize = 256;

impl CustomOp1 for QuantMatrix {
    fn name(&self) -> &'static str {
        "ee-quant-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_matmul(
            self.name(),
            storage,
            layout,
            (self.rows, self.cols),
            |x, m| self.matmul(x, m),
        )
    }
}

/// Quantizes activation rows block by block, with the AVX2 build of the
/// same code when the CPU has it (results are identical: `round` compiles to
/// an exact instruction sequence instead of a libm call).
fn quantize_activations(x: &[f32]) -> Vec<ActBlock> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { x86::quantize_activations_avx2(x) };
    }
    x.chunks_exact(BLOCK).map(quantize_block).collect()
}

/// 8-bit activation quantization exactly as candle does it (ggml's Q8_1;
/// Q8_0 is the same without the sum), scales rounded through f16, so our
/// logits match the reference implementation.
#[inline(always)]
fn quantize_block(x: &[f32]) -> ActBlock {
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
    let f16 = |v: f32| half::f16::from_f32(v).to_f32();
    let d = f16(d);
    ActBlock {
        d,
        s: f16(f16(sum as f32) * d),
        q,
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx2() -> bool {
    false
}

/// The SIMD kernels a CPU can run, best first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Isa {
    /// AVX-512 VNNI (256-bit forms): one instruction per byte dot product.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has_avx2() && has!("avx512vnni") && has!("avx512vl") {
                return Isa::Avx512Vnni;
            }
            if has_avx2() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// This CPU's kernels, and the ones it falls back to, for tests.
    #[cfg(test)]
    fn available() -> Vec<Isa> {
        let all = [
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2,
            Isa::Portable,
        ];
        let best = Isa::detect();
        all.into_iter().skip_while(|isa| *isa != best).collect()
    }
}

/// Q8_0: Σ over blocks of `d_w * d_a * Σ(q_w * q_a)`.
fn dot_q8_0_scalar(w_s: &[f32], w_q: &[[i8; BLOCK]], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for ((s, q), a) in w_s.iter().zip(w_q).zip(a) {
        let isum: i32 = q
            .iter()
            .zip(&a.q)
            .map(|(&w, &x)| i32::from(w) * i32::from(x))
            .sum();
        acc += s * a.d * isum as f32;
    }
    acc
}

/// Q4_1: Σ over blocks of `d_w * d_a * Σ(q_w * q_a) + m_w * s_a`.
fn dot_q4_1_scalar(w_s: &[[f32; 2]], w_q: &[[u8; 16]], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for ((s, q), a) in w_s.iter().zip(w_q).zip(a) {
        let mut isum = 0i32;
        for (j, &packed) in q.iter().enumerate() {
            isum += i32::from(packed & 0x0F) * i32::from(a.q[j]);
            isum += i32::from(packed >> 4) * i32::from(a.q[j + 16]);
        }
        acc += s[0] * a.d * isum as f32 + s[1] * a.s;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    const FORMATS: [GgmlDType; 2] = [GgmlDType::Q4_1, GgmlDType::Q8_0];

    /// A random quantized matrix (ours and candle's) and activations.
    fn setup(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        m: usize,
    ) -> (QuantMatrix, QMatMul, Tensor) {
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        (
            QuantMatrix::from_qtensor(&q).unwrap(),
            QMatMul::from_qtensor(q).unwrap(),
            x,
        )
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_candles_kernels_to_rounding() {
        for dtype in FORMATS {
            let (ours, theirs, x) = setup(dtype, 64, 256, 5);
            let (a, b) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
            let diff = max_abs(&(a - &b).unwrap());
            assert!(diff <= 1e-5 * max_abs(&b), "{dtype:?}: diff {diff}");
        }
    }

    #[test]
    fn simd_kernels_agree_with_the_portable_one_and_each_other() {
        for dtype in FORMATS {
            let (mat, _, x) = setup(dtype, 5, 256, 1);
            let acts = quantize_activations(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for r in 0..5 {
                let results: Vec<f32> = Isa::available()
                    .into_iter()
                    .map(|isa| mat.dot_rows(r, [&acts[..]], isa)[0])
                    .collect();
                let (portable, simd) = results.split_last().unwrap();
                for v in simd {
                    assert!(
                        (v - portable).abs() <= 1e-4 * portable.abs().max(1.0),
                        "{dtype:?}: {v} vs {portable}"
                    );
                    assert_eq!(
                        v.to_bits(),
                        simd[0].to_bits(),
                        "{dtype:?}: SIMD kernels differ"
                    );
                }
            }
        }
    }

    #[test]
    fn vectorized_quantization_is_bit_identical() {
        // Random values, plus blocks scaled by exactly 1 holding halves,
        // where rounding modes differ.
        let mut x = Tensor::randn(0f32, 3.0, (1, 32 * 64), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, v) in x[..32 * 8].iter_mut().enumerate() {
            *v = match i % 32 {
                31 => 127.0,
                j => j as f32 - 15.5,
            };
        }
        let bits = |b: &ActBlock| (b.d.to_bits(), b.s.to_bits(), b.q);
        let fast: Vec<_> = quantize_activations(&x).iter().map(bits).collect();
        let plain: Vec<_> = x
            .chunks_exact(BLOCK)
            .map(|b| bits(&quantize_block(b)))
            .collect();
        assert_eq!(fast, plain);
    }

    #[test]
    fn four_or_eight_activation_rows_at_once_are_bit_identical_to_one() {
        for dtype in FORMATS {
            let (mat, _, x) = setup(dtype, 3, 256, 8);
            let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let acts: Vec<ActBlock> = flat.chunks_exact(BLOCK).map(quantize_block).collect();
            let rows: [&[ActBlock]; 8] = std::array::from_fn(|k| &acts[k * 8..][..8]);
            for isa in Isa::available() {
                let one: Vec<u32> = rows
                    .iter()
                    .map(|row| mat.dot_rows(1, [*row], isa)[0].to_bits())
                    .collect();
                let eight = mat.dot_rows(1, rows, isa).map(f32::to_bits);
                let four = [
                    mat.dot_rows(1, [rows[0], rows[1], rows[2], rows[3]], isa),
                    mat.dot_rows(1, [rows[4], rows[5], rows[6], rows[7]], isa),
                ]
                .concat();
                assert_eq!(eight.to_vec(), one, "{dtype:?} {isa:?}");
                let four: Vec<u32> = four.into_iter().map(f32::to_bits).collect();
                assert_eq!(four, one, "{dtype:?} {isa:?}");
            }
        }
    }

    #[test]
    fn rows_are_independent_of_the_batch() {
        for dtype in FORMATS {
            let (mat, _, x) = setup(dtype, 40, 64, 13);
            let all = mat.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in all.iter().enumerate() {
                let one = mat
                    .forward(&x.narrow(0, i, 1).unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&one[0]), bits(row), "{dtype:?} row {i}");
            }
        }
    }

    #[test]
    fn other_formats_and_bad_shapes_are_refused() {
        let w = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu).unwrap();
        assert!(
            QuantMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q4_0).unwrap()).is_err()
        );
        let (mat, _, _) = setup(GgmlDType::Q8_0, 4, 64, 1);
        let wrong = Tensor::zeros((1, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(mat.forward(&wrong).is_err());
    }
}
