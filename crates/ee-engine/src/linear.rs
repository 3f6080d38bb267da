//! Weight matrices: our runtime-dispatched kernels where we have them
//! (the GGUF block formats of `crate::quant`, and float weights as stored),
//! candle's `QMatMul` otherwise.

use std::ops::Range;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, Layout, Module, Shape, Tensor};
use rayon::prelude::*;

use crate::float::FloatMatrix;
use crate::quant::QuantMatrix;
use crate::Error;

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Use candle's kernels instead of ours: its matmuls for GGUF weights
    /// (block-quantized, F16 and F32), and attention as candle-transformers
    /// computes it (a masked score matrix and a softmax) instead of our
    /// tiled kernel. Slower; with an f32 KV cache ([`Self::kv_cache_dtype`])
    /// it isolates the forward pass from kernel rounding when comparing
    /// with candle's reference model.
    pub candle_kernels: bool,
    /// Use candle's RMSNorm (an f32 sum of squares) and SiLU (libm's `exp`)
    /// instead of ours ([`crate::norm`], whose sum no order of the channels
    /// changes, and [`crate::activation`], which vectorizes): for
    /// comparisons with candle's reference model to the last bits.
    pub candle_elementwise: bool,
    /// The KV cache's element type: f16 by default, as llama.cpp; f32 for
    /// comparisons with candle's reference model, which keeps f32.
    pub kv_cache_dtype: crate::KvCacheDtype,
}

/// A weight matrix `[out, in]`; [`forward`](Linear::forward) maps
/// `[rows, in]` to `[rows, out]`, each row on its own.
pub enum Linear {
    Ours(QuantMatrix),
    Float(FloatMatrix),
    Candle(QMatMul),
}

impl Linear {
    pub fn from_qtensor(name: &str, t: QTensor, opts: &LoadOptions) -> Result<Self, Error> {
        if QuantMatrix::supports(t.dtype()) && !opts.candle_kernels {
            let matrix = QuantMatrix::from_qtensor(&t)
                .map_err(|e| Error::Model(format!("tensor {name}: {e}")))?;
            return Ok(Linear::Ours(matrix));
        }
        let t = check_candle_kernel_layout(name, t)?;
        Ok(Linear::Candle(QMatMul::from_qtensor(t)?))
    }

    /// The weights' format (`Q4_1`, `BF16`, …), marked when candle's
    /// kernels run it.
    pub fn format(&self) -> String {
        match self {
            Linear::Ours(m) => m.format().to_owned(),
            Linear::Float(m) => m.format().to_owned(),
            Linear::Candle(QMatMul::QTensor(t)) => {
                format!("{} (candle)", crate::weights::gguf::ggml_name(t.dtype()))
            }
            Linear::Candle(QMatMul::Tensor(_)) => "F32 (candle)".to_owned(),
            Linear::Candle(QMatMul::TensorF16(_)) => "F16 (candle)".to_owned(),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        match self {
            Linear::Ours(m) => m.forward(x),
            Linear::Float(m) => m.forward(x),
            Linear::Candle(m) => Ok(m.forward(x)?),
        }
    }
}

/// Matrices that multiply the same input: q, k and v; gate and up.
/// [`forward`](Stacked::forward) gives each one's output, the same bits
/// either way (each output is its own weight row's dot product).
pub enum Stacked {
    /// One matrix of all their rows, and each part's number of rows.
    One(Linear, Vec<usize>),
    /// Parts of different types, each its own matrix.
    Separate(Vec<Linear>),
}

impl Stacked {
    /// Each part's output for `x` `[m, in]`: `[m, part rows]`, contiguous.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>, Error> {
        match self {
            Stacked::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
            Stacked::One(linear, widths) => {
                let y = linear.forward(x)?;
                let mut at = 0;
                let mut outs = Vec::with_capacity(widths.len());
                for &w in widths {
                    outs.push(y.narrow(candle_core::D::Minus1, at, w)?.contiguous()?);
                    at += w;
                }
                Ok(outs)
            }
        }
    }

    /// The matrices, for their formats.
    pub fn linears(&self) -> Vec<&Linear> {
        match self {
            Stacked::One(linear, _) => vec![linear],
            Stacked::Separate(parts) => parts.iter().collect(),
        }
    }
}

/// candle's Q4_1/Q5_0/Q5_1 dot products process blocks in pairs and panic
/// (poisoning the thread pool) on an odd count; refuse such a matrix at load
/// when candle's kernels would run it (ours take any count).
fn check_candle_kernel_layout(name: &str, t: QTensor) -> Result<QTensor, Error> {
    if matches!(
        t.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    ) {
        let row = t.shape().dims().last().copied().unwrap_or(0);
        if !(row / t.dtype().block_size()).is_multiple_of(2) {
            return Err(Error::Unsupported(format!(
                "{name}: {:?} rows of {row} values (an odd number of blocks)",
                t.dtype()
            )));
        }
    }
    Ok(t)
}

/// `y = x · Wᵀ` for our kernels, `[m, n]`, computed weight row by weight
/// row in parallel: `rows(range, out)` writes, through `out`, the outputs
/// of weight rows `range` for each of the `m` activation rows. Each range
/// starts at a multiple of `granule` (a kernel's group of rows). Each
/// output depends only on its weight row and its activation row.
///
/// Outputs go straight to their place in `y`: a task's weight rows are a
/// column band of `y`, and bands do not overlap. (Written weight-row-major
/// and transposed after, the copy was 14% of a Q4_0 prefill.)
pub(crate) fn by_weight_rows(
    n: usize,
    m: usize,
    granule: usize,
    rows: impl Fn(Range<usize>, &mut Outputs<'_>) + Sync,
) -> Vec<f32> {
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let threads = rayon::current_num_threads().max(1);
    let chunk = (n / (threads * 4)).clamp(8, 256).next_multiple_of(granule);
    let mut y = vec![0f32; m * n];
    let base = SharedOut(y.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let band = c * chunk..((c + 1) * chunk).min(n);
        let mut out = Outputs {
            y: &base,
            n,
            m,
            rows: band.clone(),
        };
        rows(band, &mut out)
    });
    y
}

/// `y`'s buffer, shared by [`by_weight_rows`]' tasks, each of which writes
/// only its own band of columns.
struct SharedOut(*mut f32);

// SAFETY: tasks write disjoint elements (see `Outputs`), and `y` outlives
// them (`for_each` returns after every task).
unsafe impl Sync for SharedOut {}

/// One [`by_weight_rows`] task's view of `y` `[m, n]`: the columns of its
/// weight rows, and nothing else.
pub(crate) struct Outputs<'a> {
    y: &'a SharedOut,
    n: usize,
    m: usize,
    rows: Range<usize>,
}

impl Outputs<'_> {
    /// Stores a group of weight rows' outputs: `outs[k][j]` is weight row
    /// `g·G + j` against activation row `i + k`. Rows past the task's band
    /// (padding in a matrix whose rows are not whole groups) are dropped.
    pub(crate) fn put_group<const G: usize>(&mut self, (g, i): (usize, usize), outs: &[[f32; G]]) {
        let first = g * G;
        assert!(self.rows.contains(&first) && i + outs.len() <= self.m);
        let width = G.min(self.rows.end.saturating_sub(first));
        for (k, outs) in outs.iter().enumerate() {
            // SAFETY: row `i + k` < m, and columns `first..first + width`
            // lie in this task's band, inside `y`'s `m·n`; no other task
            // writes them.
            unsafe {
                let at = self.y.0.add((i + k) * self.n + first);
                std::ptr::copy_nonoverlapping(outs.as_ptr(), at, width);
            }
        }
    }

    /// Stores weight row `r`'s outputs against activation rows
    /// `i..i + outs.len()`.
    pub(crate) fn put_row(&mut self, r: usize, i: usize, outs: &[f32]) {
        assert!(self.rows.contains(&r) && i + outs.len() <= self.m);
        for (k, &v) in outs.iter().enumerate() {
            // SAFETY: as in `put_group`, for column `r`.
            unsafe { *self.y.0.add((i + k) * self.n + r) = v };
        }
    }
}

/// candle's side of our matmuls (`CustomOp1::cpu_fwd`): takes contiguous
/// f32 activations `[.., cols]` and returns `matmul(x, m)` as `[.., rows]`.
pub(crate) fn cpu_matmul(
    name: &str,
    storage: &CpuStorage,
    layout: &Layout,
    (rows, cols): (usize, usize),
    matmul: impl FnOnce(&[f32], usize) -> Vec<f32>,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{name} takes f32 activations");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name} takes contiguous activations");
    };
    let mut dims = layout.shape().dims().to_vec();
    if dims.last() != Some(&cols) {
        candle_core::bail!("{name}: input {dims:?} does not end in {cols}");
    }
    let m = layout.shape().elem_count() / cols;
    let y = matmul(&data[start..end], m);
    dims.pop();
    dims.push(rows);
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}
