//! Float weight matmuls: f32, f16 and bf16 weights kept as stored (a
//! Hugging Face checkpoint's dtype), f32 activations and accumulation.
//!
//! Each weight row is widened to f32 once per matmul, with the half crate's
//! SIMD conversions, and then dotted with every activation row in eight
//! independent lanes: the same operations in the same order whatever the
//! batch, so a sequence's outputs do not depend on what else is in it. The
//! loop runs as an AVX2 build when the CPU has it (chosen at run time, the
//! same bits), as llama.cpp's `ggml_vec_dot_f16` widens and accumulates in
//! f32.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::linear::{by_weight_rows, cpu_matmul};
use crate::Error;

/// Weights in their stored element type, row-major `[rows, cols]`.
pub enum FloatWeights {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl FloatWeights {
    fn len(&self) -> usize {
        match self {
            FloatWeights::F32(w) => w.len(),
            FloatWeights::F16(w) => w.len(),
            FloatWeights::BF16(w) => w.len(),
        }
    }
}

/// A float weight matrix `[rows, cols]`.
pub struct FloatMatrix {
    rows: usize,
    cols: usize,
    weights: FloatWeights,
}

impl FloatMatrix {
    /// Errors when `weights` does not hold `rows * cols` values.
    pub fn new(rows: usize, cols: usize, weights: FloatWeights) -> Result<Self, Error> {
        if rows.checked_mul(cols) != Some(weights.len()) {
            return Err(Error::Model(format!(
                "{} float weights do not make a [{rows}, {cols}] matrix",
                weights.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            weights,
        })
    }

    /// Row `r` as f32, widened into `buf` unless it is stored as f32.
    fn row<'a>(&'a self, r: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.weights {
            FloatWeights::F32(w) => &w[span],
            FloatWeights::F16(w) => {
                w[span].convert_to_f32_slice(buf);
                buf
            }
            FloatWeights::BF16(w) => {
                w[span].convert_to_f32_slice(buf);
                buf
            }
        }
    }

    /// The stored element type: `F32`, `F16` or `BF16`.
    pub fn format(&self) -> &'static str {
        match self.weights {
            FloatWeights::F32(_) => "F32",
            FloatWeights::F16(_) => "F16",
            FloatWeights::BF16(_) => "BF16",
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(x.apply_op1_no_bwd(self)?)
    }

    /// `y = x · Wᵀ` for `m` activation rows `x` (`[m, cols]`): `[m, rows]`.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        by_weight_rows(self.rows, m, 1, |rows, outputs| {
            let mut buf = vec![0f32; self.cols];
            for (r, out) in rows.zip(outputs.chunks_exact_mut(m)) {
                dot_rows(self.row(r, &mut buf), x, out);
            }
        })
    }
}

/// `out[i] = w · x_i` for every row `x_i` of `x`, as an AVX2 build when the
/// CPU has it.
fn dot_rows(w: &[f32], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { dot_rows_avx2(w, x, out) };
    }
    dot_rows_portable(w, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(w: &[f32], x: &[f32], out: &mut [f32]) {
    dot_rows_portable(w, x, out)
}

#[inline(always)]
fn dot_rows_portable(w: &[f32], x: &[f32], out: &mut [f32]) {
    let k = w.len();
    let row = |i: usize| &x[i * k..][..k];
    // Eight, then four activation rows share each load of the weights.
    let mut i = 0;
    while i + 8 <= out.len() {
        out[i..i + 8].copy_from_slice(&dot_n::<8>(w, std::array::from_fn(|j| row(i + j))));
        i += 8;
    }
    if i + 4 <= out.len() {
        out[i..i + 4].copy_from_slice(&dot_n::<4>(w, std::array::from_fn(|j| row(i + j))));
        i += 4;
    }
    for (j, o) in out.iter_mut().enumerate().skip(i) {
        *o = dot(w, row(j));
    }
}

/// A dot product in eight independent lanes, which the compiler vectorizes
/// (a plain iterator sum must keep its sequential float order, and does not).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_n(a, [b])[0]
}

/// `w · x_n` for `N` vectors at once: each result is summed exactly as
/// [`dot`] sums it, whatever `N`, so batching changes no bit.
#[inline(always)]
fn dot_n<const N: usize>(w: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    let mut lanes = [[0f32; 8]; N];
    let body = w.len() / 8 * 8;
    let xs8: [&[[f32; 8]]; N] = xs.map(|x| x[..body].as_chunks::<8>().0);
    for (c, wc) in w[..body].as_chunks::<8>().0.iter().enumerate() {
        for (lane, x) in lanes.iter_mut().zip(&xs8) {
            let xc = &x[c];
            for j in 0..8 {
                lane[j] += wc[j] * xc[j];
            }
        }
    }
    std::array::from_fn(|n| {
        let tail: f32 = w[body..]
            .iter()
            .zip(&xs[n][body..])
            .map(|(a, b)| a * b)
            .sum();
        lanes[n].iter().sum::<f32>() + tail
    })
}

impl CustomOp1 for FloatMatrix {
    fn name(&self) -> &'static str {
        "ee-float-matmul"
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn every_dtype_matches_a_plain_matmul_and_rows_do_not_see_the_batch() {
        let (rows, cols, m) = (19, 45, 9);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
            .collect();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 32.0)
            .collect();
        let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
        // These values are exact in f16 and bf16, so every dtype gives the
        // same products.
        for weights in [
            FloatWeights::F32(w.clone()),
            FloatWeights::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
            FloatWeights::BF16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
        ] {
            let mat = FloatMatrix::new(rows, cols, weights).unwrap();
            let y: Vec<Vec<f32>> = mat.forward(&xt).unwrap().to_vec2().unwrap();
            for i in 0..m {
                for r in 0..rows {
                    let want: f32 = (0..cols).map(|k| x[i * cols + k] * w[r * cols + k]).sum();
                    assert!(
                        (y[i][r] - want).abs() < 1e-3,
                        "{i},{r}: {} vs {want}",
                        y[i][r]
                    );
                }
                let alone =
                    Tensor::from_vec(x[i * cols..][..cols].to_vec(), (1, cols), &Device::Cpu)
                        .unwrap();
                let alone: Vec<f32> = mat
                    .forward(&alone)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&alone), bits(&y[i]), "row {i} changed with the batch");
            }
        }
        assert!(FloatMatrix::new(2, 3, FloatWeights::F32(vec![0.0; 5])).is_err());
    }
}
