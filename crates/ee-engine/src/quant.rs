//! Q4_1 and Q8_0 weight matmuls with runtime-detected AVX2 kernels.
//!
//! In a portable build candle's CPU dot products for these formats are
//! scalar, and they hold nearly all of the default model's weights (Q4_1
//! layers, a Q8_0 embedding that doubles as the output head). These kernels
//! quantize each activation row to 8 bits once per matmul, exactly as candle
//! and llama.cpp do, and compute each output with AVX2 integer dot products
//! when the CPU has them, chosen at run time so builds stay portable.
//!
//! Every activation row is computed on its own, in a fixed order, so a
//! sequence's outputs do not depend on what else is in the batch.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Error;

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

    /// Output row `r` for four activation rows; each result is bit-identical
    /// to [`dot_row`](Self::dot_row)'s (same operations, same order).
    fn dot_row_x4(&self, r: usize, a: [&[ActBlock]; 4], use_avx2: bool) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            let nb = self.cols / BLOCK;
            // SAFETY: `use_avx2` is only set when the CPU reports AVX2 and FMA.
            return unsafe {
                match &self.blocks {
                    Blocks::Q4_1 { scales, codes } => {
                        dot_q4_1_avx2_x4(&scales[r * nb..][..nb], &codes[r * nb..][..nb], a)
                    }
                    Blocks::Q8_0 { scales, codes } => {
                        dot_q8_0_avx2_x4(&scales[r * nb..][..nb], &codes[r * nb..][..nb], a)
                    }
                }
            };
        }
        a.map(|a| self.dot_row(r, a, use_avx2))
    }

    /// Output row `r` for one activation row's blocks `a`.
    fn dot_row(&self, r: usize, a: &[ActBlock], use_avx2: bool) -> f32 {
        let nb = self.cols / BLOCK;
        match &self.blocks {
            Blocks::Q4_1 { scales, codes } => {
                dot_q4_1(&scales[r * nb..][..nb], &codes[r * nb..][..nb], a, use_avx2)
            }
            Blocks::Q8_0 { scales, codes } => {
                dot_q8_0(&scales[r * nb..][..nb], &codes[r * nb..][..nb], a, use_avx2)
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(x.apply_op1_no_bwd(self)?)
    }

    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let acts = quantize_activations(x);
        let n = self.rows;
        let threads = rayon::current_num_threads().max(1);
        let chunk = (n / (threads * 4)).clamp(8, 256);
        let use_avx2 = has_avx2();
        // Computed weight row by weight row, so `yt` is `[n][m]`.
        let mut yt = vec![0f32; n * m];
        yt.par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, outputs)| {
                for (r, out) in (c * chunk..).zip(outputs.chunks_exact_mut(m)) {
                    let mut i = 0;
                    // Four activation rows share each unpacked weight block.
                    while i + 4 <= m {
                        let a: [&[ActBlock]; 4] =
                            std::array::from_fn(|k| &acts[(i + k) * nb..][..nb]);
                        out[i..i + 4].copy_from_slice(&self.dot_row_x4(r, a, use_avx2));
                        i += 4;
                    }
                    for (i, o) in out.iter_mut().enumerate().skip(i) {
                        *o = self.dot_row(r, &acts[i * nb..][..nb], use_avx2);
                    }
                }
            });
        if m == 1 {
            return yt;
        }
        let mut y = vec![0f32; m * n];
        for (i, y_row) in y.chunks_exact_mut(n).enumerate() {
            for (o, v) in y_row.iter_mut().zip(yt[i..].iter().step_by(m)) {
                *o = *v;
            }
        }
        y
    }
}

impl CustomOp1 for QuantMatrix {
    fn name(&self) -> &'static str {
        "ee-quant-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("ee-quant-matmul takes f32 activations");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("ee-quant-matmul takes contiguous activations");
        };
        let mut dims = layout.shape().dims().to_vec();
        if dims.last() != Some(&self.cols) {
            candle_core::bail!(
                "ee-quant-matmul: input {:?} does not end in {}",
                dims,
                self.cols
            );
        }
        let m = layout.shape().elem_count() / self.cols;
        let y = self.matmul(&data[start..end], m);
        dims.pop();
        dims.push(self.rows);
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

/// Quantizes activation rows block by block, with the AVX2 build of the
/// same code when the CPU has it (results are identical: `round` compiles to
/// an exact instruction sequence instead of a libm call).
fn quantize_activations(x: &[f32]) -> Vec<ActBlock> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { quantize_activations_avx2(x) };
    }
    x.chunks_exact(BLOCK).map(quantize_block).collect()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_activations_avx2(x: &[f32]) -> Vec<ActBlock> {
    let mut blocks = Vec::with_capacity(x.len() / BLOCK);
    for block in x.chunks_exact(BLOCK) {
        blocks.push(quantize_block(block));
    }
    blocks
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

/// Q4_1: Σ over blocks of `d_w * d_a * Σ(q_w * q_a) + m_w * s_a`.
fn dot_q4_1(w_s: &[[f32; 2]], w_q: &[[u8; 16]], a: &[ActBlock], use_avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if use_avx2 {
        // SAFETY: `use_avx2` is only set when the CPU reports AVX2 and FMA.
        return unsafe { dot_q4_1_avx2(w_s, w_q, a) };
    }
    let _ = use_avx2;
    dot_q4_1_scalar(w_s, w_q, a)
}

/// Q8_0: Σ over blocks of `d_w * d_a * Σ(q_w * q_a)`.
fn dot_q8_0(w_s: &[f32], w_q: &[[i8; BLOCK]], a: &[ActBlock], use_avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if use_avx2 {
        // SAFETY: `use_avx2` is only set when the CPU reports AVX2 and FMA.
        return unsafe { dot_q8_0_avx2(w_s, w_q, a) };
    }
    let _ = use_avx2;
    dot_q8_0_scalar(w_s, w_q, a)
}

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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8_0_avx2(w_s: &[f32], w_q: &[[i8; BLOCK]], a: &[ActBlock]) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for ((s, q), a) in w_s.iter().zip(w_q).zip(a) {
        let w = _mm256_loadu_si256(q.as_ptr().cast());
        let x = _mm256_loadu_si256(a.q.as_ptr().cast());
        // maddubs takes u8 x i8: move w's sign onto x (ggml's trick). Pairs
        // sum to at most 2 * 127 * 128, which fits i16.
        let sums = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
            ones,
        );
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s * a.d), _mm256_cvtepi32_ps(sums), acc);
    }
    hsum(acc)
}

/// [`dot_q8_0_avx2`] for four activation rows at once, sharing each weight
/// block's sign split.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8_0_avx2_x4(w_s: &[f32], w_q: &[[i8; BLOCK]], a: [&[ActBlock]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1, mut acc2, mut acc3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let [a0, a1, a2, a3] = a;
    for (b, (s, q)) in w_s.iter().zip(w_q).enumerate() {
        let w = _mm256_loadu_si256(q.as_ptr().cast());
        let w_abs = _mm256_sign_epi8(w, w);
        let step = |acc: __m256, x: &ActBlock| {
            let x_signed = _mm256_sign_epi8(_mm256_loadu_si256(x.q.as_ptr().cast()), w);
            let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, x_signed), ones);
            _mm256_fmadd_ps(_mm256_set1_ps(s * x.d), _mm256_cvtepi32_ps(sums), acc)
        };
        acc0 = step(acc0, &a0[b]);
        acc1 = step(acc1, &a1[b]);
        acc2 = step(acc2, &a2[b]);
        acc3 = step(acc3, &a3[b]);
    }
    [hsum(acc0), hsum(acc1), hsum(acc2), hsum(acc3)]
}

/// [`dot_q4_1_avx2`] for four activation rows at once: each weight block is
/// unpacked once, and the four accumulators are independent chains.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q4_1_avx2_x4(w_s: &[[f32; 2]], w_q: &[[u8; 16]], a: [&[ActBlock]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1, mut acc2, mut acc3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    let (mut min0, mut min1, mut min2, mut min3) = (0f32, 0f32, 0f32, 0f32);
    let [a0, a1, a2, a3] = a;
    for (b, (s, q)) in w_s.iter().zip(w_q).enumerate() {
        let packed = _mm_loadu_si128(q.as_ptr().cast());
        let w = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(packed, 4), low),
            _mm_and_si128(packed, low),
        );
        let step = |acc: __m256, x: &ActBlock| {
            let sums = _mm256_madd_epi16(
                _mm256_maddubs_epi16(w, _mm256_loadu_si256(x.q.as_ptr().cast())),
                ones,
            );
            _mm256_fmadd_ps(_mm256_set1_ps(s[0] * x.d), _mm256_cvtepi32_ps(sums), acc)
        };
        let (x0, x1, x2, x3) = (&a0[b], &a1[b], &a2[b], &a3[b]);
        acc0 = step(acc0, x0);
        acc1 = step(acc1, x1);
        acc2 = step(acc2, x2);
        acc3 = step(acc3, x3);
        min0 += s[1] * x0.s;
        min1 += s[1] * x1.s;
        min2 += s[1] * x2.s;
        min3 += s[1] * x3.s;
    }
    [
        hsum(acc0) + min0,
        hsum(acc1) + min1,
        hsum(acc2) + min2,
        hsum(acc3) + min3,
    ]
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q4_1_avx2(w_s: &[[f32; 2]], w_q: &[[u8; 16]], a: &[ActBlock]) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = 0f32;
    for ((s, q), a) in w_s.iter().zip(w_q).zip(a) {
        let packed = _mm_loadu_si128(q.as_ptr().cast());
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let w = _mm256_set_m128i(hi, lo);
        let x = _mm256_loadu_si256(a.q.as_ptr().cast());
        // u8 x i8 pairs summed to i16 (at most 2 * 15 * 127, no saturation), then to i32.
        let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s[0] * a.d), _mm256_cvtepi32_ps(sums), acc);
        acc_min += s[1] * a.s;
    }
    hsum(acc) + acc_min
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
    fn avx2_and_scalar_paths_agree() {
        if !has_avx2() {
            return;
        }
        for dtype in FORMATS {
            let (mat, _, x) = setup(dtype, 5, 256, 1);
            let acts: Vec<ActBlock> = x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .chunks_exact(BLOCK)
                .map(quantize_block)
                .collect();
            for r in 0..5 {
                let (a, b) = (mat.dot_row(r, &acts, false), mat.dot_row(r, &acts, true));
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "{dtype:?}: {a} vs {b}"
                );
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
    fn four_activation_rows_at_once_are_bit_identical_to_one() {
        for dtype in FORMATS {
            let (mat, _, x) = setup(dtype, 3, 256, 4);
            let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let acts: Vec<ActBlock> = flat.chunks_exact(BLOCK).map(quantize_block).collect();
            let rows: [&[ActBlock]; 4] = std::array::from_fn(|k| &acts[k * 8..][..8]);
            for avx2 in [false, has_avx2()] {
                let four = mat.dot_row_x4(1, rows, avx2);
                for k in 0..4 {
                    assert_eq!(
                        four[k].to_bits(),
                        mat.dot_row(1, rows[k], avx2).to_bits(),
                        "{dtype:?} avx2={avx2}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_are_independent_of_the_batch() {
        for dtype in FORMATS {
            let (mat, _, x) = setup(dtype, 40, 64, 6);
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
