//! Float weight matmuls: f32, f16 and bf16 weights kept as stored (a
//! Hugging Face checkpoint's dtype, or a GGUF's F16/F32 matrices), f32
//! activations and accumulation.
//!
//! Weights are repacked in groups of eight rows, column by column, so that
//! one vector holds one column of eight rows: a GEMM micro-kernel then
//! multiplies it by one activation broadcast, with no horizontal sums, and
//! widens f16 (F16C) or bf16 (a shift) in registers, as llama.cpp widens
//! and accumulates in f32.
//!
//! Every output is defined as two fused multiply-add chains over the
//! columns, even and odd, added at the end: the portable and AVX2 builds
//! compute exactly that, whatever the batch, so a sequence's outputs do not
//! depend on what else is in it or on the CPU.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
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

/// Weight rows per group.
const GROUP: usize = 8;

/// A float weight matrix `[rows, cols]`, in groups of [`GROUP`] rows: value
/// `(g·8 + r, k)` at `(g·cols + k)·8 + r`, the last group padded with zeros.
pub struct FloatMatrix {
    rows: usize,
    cols: usize,
    weights: FloatWeights,
}

/// Row-major `[rows, cols]` values in groups of eight rows, column-major
/// within a group.
fn interleave<T: Copy + Default>(w: &[T], rows: usize, cols: usize) -> Vec<T> {
    let groups = rows.div_ceil(GROUP);
    let mut out = vec![T::default(); groups * cols * GROUP];
    for (r, row) in w.chunks_exact(cols).enumerate() {
        let (g, lane) = (r / GROUP, r % GROUP);
        for (k, &v) in row.iter().enumerate() {
            out[(g * cols + k) * GROUP + lane] = v;
        }
    }
    out
}

impl FloatMatrix {
    /// Errors when `weights` does not hold `rows * cols` values.
    pub fn new(rows: usize, cols: usize, weights: FloatWeights) -> Result<Self, Error> {
        if rows.checked_mul(cols) != Some(weights.len()) || cols == 0 {
            return Err(Error::Model(format!(
                "{} float weights do not make a [{rows}, {cols}] matrix",
                weights.len()
            )));
        }
        let weights = match weights {
            FloatWeights::F32(w) => FloatWeights::F32(interleave(&w, rows, cols)),
            FloatWeights::F16(w) => FloatWeights::F16(interleave(&w, rows, cols)),
            FloatWeights::BF16(w) => FloatWeights::BF16(interleave(&w, rows, cols)),
        };
        Ok(Self {
            rows,
            cols,
            weights,
        })
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
        match &self.weights {
            FloatWeights::F32(w) => self.matmul_in(w, x, m),
            FloatWeights::F16(w) => self.matmul_in(w, x, m),
            FloatWeights::BF16(w) => self.matmul_in(w, x, m),
        }
    }

    fn matmul_in<T: Widen>(&self, w: &[T], x: &[f32], m: usize) -> Vec<f32> {
        let k = self.cols;
        let simd = simd_available();
        let group = |g: usize| &w[g * k * GROUP..][..k * GROUP];
        let act = |i: usize| &x[i * k..][..k];
        by_weight_rows(self.rows, m, GROUP, |rows, outputs| {
            let (start, end) = (rows.start, rows.end);
            let mut put = |g: usize, i: usize, outs: &[[f32; GROUP]]| {
                for (n, out) in outs.iter().enumerate() {
                    for (lane, &v) in out.iter().enumerate() {
                        let r = g * GROUP + lane;
                        if r < end {
                            outputs[(r - start) * m + i + n] = v;
                        }
                    }
                }
            };
            let groups = start / GROUP..end.div_ceil(GROUP);
            let mut g = groups.start;
            // Decoding: four groups share each activation broadcast.
            if m < 4 {
                while g + 4 <= groups.end {
                    for i in 0..m {
                        let ws: [&[T]; 4] = std::array::from_fn(|j| group(g + j));
                        for (j, out) in tile(ws, [act(i)], simd).iter().enumerate() {
                            put(g + j, i, out);
                        }
                    }
                    g += 4;
                }
            }
            // Prompts: four activation rows share each weight load.
            for g in g..groups.end {
                let mut i = 0;
                while i + 4 <= m {
                    let [out] =
                        tile::<T, 1, 4>([group(g)], std::array::from_fn(|n| act(i + n)), simd);
                    put(g, i, &out);
                    i += 4;
                }
                for i in i..m {
                    let [out] = tile([group(g)], [act(i)], simd);
                    put(g, i, &out);
                }
            }
        })
    }
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::quant::has_avx2() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A stored float type widened to f32, one value or (x86) eight at once.
trait Widen: Copy + Default + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight values from `p`.
    ///
    /// # Safety
    /// `p` must point at eight readable values; the CPU must have AVX2 and
    /// F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Widen for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Widen for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

impl Widen for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // bf16 is the top half of an f32.
        use std::arch::x86_64::*;
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }
}

/// The outputs of `R` groups (eight rows each) for `N` activation rows.
fn tile<T: Widen, const R: usize, const N: usize>(
    w: [&[T]; R],
    x: [&[f32]; N],
    simd: bool,
) -> [[[f32; GROUP]; N]; R] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` says the CPU has AVX2, FMA and F16C.
        return unsafe { tile_avx2(w, x) };
    }
    let _ = simd;
    tile_portable(w, x)
}

/// The definition: per output, fused chains over even and odd columns.
fn tile_portable<T: Widen, const R: usize, const N: usize>(
    w: [&[T]; R],
    x: [&[f32]; N],
) -> [[[f32; GROUP]; N]; R] {
    w.map(|w| {
        x.map(|x| {
            std::array::from_fn(|lane| {
                let mut chains = [0f32; 2];
                for (k, &xk) in x.iter().enumerate() {
                    let c = &mut chains[k % 2];
                    *c = w[k * GROUP + lane].to_f32().mul_add(xk, *c);
                }
                chains[0] + chains[1]
            })
        })
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<T: Widen, const R: usize, const N: usize>(
    w: [&[T]; R],
    x: [&[f32]; N],
) -> [[[f32; GROUP]; N]; R] {
    use std::arch::x86_64::*;
    let k = x[0].len();
    assert!(w.iter().all(|w| w.len() >= k * GROUP) && x.iter().all(|x| x.len() == k));
    let mut acc = [[[_mm256_setzero_ps(); 2]; N]; R];
    // One column into its chain (`col % 2`) for every group and row.
    let mut step = |col: usize| {
        // SAFETY: col < k, and each group holds k columns of eight (above).
        let ws: [__m256; R] = std::array::from_fn(|j| T::load8(w[j].as_ptr().add(col * GROUP)));
        for (n, x) in x.iter().enumerate() {
            let xb = _mm256_set1_ps(*x.get_unchecked(col));
            for (j, &wv) in ws.iter().enumerate() {
                let c = &mut acc[j][n][col % 2];
                *c = _mm256_fmadd_ps(wv, xb, *c);
            }
        }
    };
    for col in (0..k / 2 * 2).step_by(2) {
        step(col);
        step(col + 1);
    }
    if k % 2 == 1 {
        step(k - 1);
    }
    acc.map(|a| {
        a.map(|[even, odd]| {
            let mut out = [0f32; GROUP];
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(even, odd));
            out
        })
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

    #[test]
    fn the_simd_build_computes_the_portable_definition_bit_for_bit() {
        if !simd_available() {
            return;
        }
        let cols = 37;
        let w: Vec<f32> = (0..4 * GROUP * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 317.0)
            .collect();
        let x: Vec<f32> = (0..4 * cols)
            .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 211.0)
            .collect();
        let xs: [&[f32]; 4] = std::array::from_fn(|n| &x[n * cols..][..cols]);
        let f16s: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let bf16s: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        fn check<T: Widen>(w: &[T], cols: usize, xs: [&[f32]; 4]) {
            let gs: [&[T]; 4] = std::array::from_fn(|j| &w[j * cols * GROUP..][..cols * GROUP]);
            let bits = |t: &[[[f32; GROUP]; 1]; 4]| t.map(|[o]| o.map(f32::to_bits));
            // SAFETY: the test returned early without AVX2, FMA and F16C.
            let fast = unsafe { tile_avx2(gs, [xs[0]]) };
            assert_eq!(bits(&fast), bits(&tile_portable(gs, [xs[0]])));
            let [fast] = unsafe { tile_avx2([gs[1]], xs) };
            let [slow] = tile_portable([gs[1]], xs);
            assert_eq!(
                fast.map(|o| o.map(f32::to_bits)),
                slow.map(|o| o.map(f32::to_bits))
            );
        }
        check(&w, cols, xs);
        check(&f16s, cols, xs);
        check(&bf16s, cols, xs);
    }
}
