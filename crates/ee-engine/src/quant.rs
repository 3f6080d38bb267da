//! Block-quantized (GGUF) weight matmuls with runtime-detected SIMD kernels.
//!
//! In a portable build candle's CPU dot products are scalar. These kernels
//! cover the formats GGUF releases ship: ggml's 32-value blocks (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0; `legacy`), repacked in groups of eight weight rows
//! (`interleaved`), and the K-quants (Q4_K, Q5_K, Q6_K; `k_quants`), which
//! Q4_K_M and Q5_K_M files mix with Q5_0/Q5_1/Q8_0 where a row is not a
//! whole number of 256-value super-blocks. Each activation row is quantized
//! to 8 bits once per matmul, exactly as candle does (Q8_0/Q8_1 blocks, or
//! Q8_K for the K-quants), and each output is computed with integer dot
//! products: AVX-512 VNNI (the 32-value formats) or AVX2 when the CPU has
//! them, chosen at run time so builds stay portable. Up to eight activation
//! rows (a decode batch, a prompt's tile) share each weight block as it is
//! unpacked.
//!
//! Every output is one chain of operations over its weight row and its
//! activation row, the same whatever the batch and the build, so a
//! sequence's outputs do not depend on what else is in the batch, and every
//! build (VNNI, AVX2, portable) gives the same bits.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::linear::{by_weight_rows, cpu_matmul};
use crate::Error;

mod interleaved;
mod k_quants;
mod legacy;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_k;

use interleaved::Interleaved;
use k_quants::{ActBlockK, Q4K, Q5K, Q6K, QK_K};
use legacy::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};

/// `f` over each `elems`-value block of `x`, as an AVX2 build when the CPU
/// has it (the same results: `round` compiles to an exact instruction
/// sequence instead of a libm call). A prompt's many blocks are split over
/// the thread pool: each block's result is its own, so the split changes
/// nothing but the time (serial, it was 8% of a 512-token prefill, with
/// the other core idle).
pub(crate) fn map_blocks<B: Send>(
    x: &[f32],
    elems: usize,
    // `Copy`, so that each task gets `f` itself, which inlines into the
    // AVX2 loop, not a reference, which is called through.
    f: impl Fn(&[f32]) -> B + Sync + Copy,
) -> Vec<B> {
    use rayon::prelude::*;
    /// Blocks per parallel task: a decode step's few stay on one thread.
    const TASK_BLOCKS: usize = 512;
    if x.len() >= 2 * TASK_BLOCKS * elems && rayon::current_num_threads() > 1 {
        let parts: Vec<Vec<B>> = x
            .par_chunks(TASK_BLOCKS * elems)
            .map(|part| map_blocks_serial(part, elems, f))
            .collect();
        return parts.into_iter().flatten().collect();
    }
    map_blocks_serial(x, elems, f)
}

/// `x.round() as i8`: half away from zero, saturating, NaN to 0; in
/// operations that vectorize, which Rust's saturating cast does not (it
/// was half of quantizing activations).
#[inline(always)]
pub(crate) fn round_to_i8(x: f32) -> i8 {
    let r = x.round();
    let r = if r.is_nan() {
        0.0
    } else {
        r.clamp(-128.0, 127.0)
    };
    crate::activation::small_whole_as_i32(r) as i8
}

fn map_blocks_serial<B>(x: &[f32], elems: usize, f: impl Fn(&[f32]) -> B) -> Vec<B> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { map_blocks_avx2(x, elems, f) };
    }
    x.chunks_exact(elems).map(f).collect()
}

/// A plain loop, so that `f` (inline) is compiled with these features; an
/// iterator's `collect` would call it from code compiled without them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_blocks_avx2<B>(x: &[f32], elems: usize, f: impl Fn(&[f32]) -> B) -> Vec<B> {
    let mut blocks = Vec::with_capacity(x.len() / elems);
    for block in x.chunks_exact(elems) {
        blocks.push(f(block));
    }
    blocks
}

/// One K-quant super-block, unpacked for our kernels.
pub(crate) trait WeightBlock: Sized + Send + Sync + 'static {
    /// The format's name, as ggml spells it.
    const NAME: &'static str;
    /// Size of the block on disk.
    const BYTES: usize;
    /// Reads one on-disk block (`BYTES` long).
    fn unpack(bytes: &[u8]) -> Self;
    /// One weight row's dot products with `N` activation rows, each
    /// bit-identical whatever `N` and whichever SIMD build runs it.
    fn dot<const N: usize>(w: &[Self], a: [&[ActBlockK]; N], isa: Isa) -> [f32; N];
}

/// A weight matrix of one K-quant format's blocks, row-major.
struct Blocks<W> {
    rows: usize,
    cols: usize,
    blocks: Vec<W>,
}

/// What [`QuantMatrix`] asks of a format's matrix.
pub(crate) trait Kernel: Send + Sync {
    fn format(&self) -> &'static str;
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32>;
    /// Weight row `r` against all of `x`'s 1, 4 or 8 rows in one call.
    #[cfg(test)]
    fn dots_for_test(&self, x: &[f32], r: usize, isa: Isa) -> Vec<f32>;
}

/// A quantized weight matrix `[rows, cols]` with our own kernels.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    kernel: Box<dyn Kernel>,
}

impl QuantMatrix {
    /// The weights' format, as ggml names it.
    pub fn format(&self) -> &'static str {
        self.kernel.format()
    }

    /// Whether these kernels handle a format.
    pub fn supports(dtype: GgmlDType) -> bool {
        use GgmlDType::*;
        matches!(dtype, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K)
    }

    /// Unpacks a `QTensor` of shape `[rows, cols]` in a [supported]
    /// (Self::supports) format; errors on others, on rows that are not whole
    /// blocks and on data of the wrong size.
    pub fn from_qtensor(t: &QTensor) -> Result<Self, Error> {
        let (rows, cols) = t.shape().dims2()?;
        let data = || t.data().map_err(Error::from);
        let kernel: Box<dyn Kernel> = match t.dtype() {
            GgmlDType::Q4_0 => Box::new(Interleaved::<Q4_0>::new(&data()?, rows, cols)?),
            GgmlDType::Q4_1 => Box::new(Interleaved::<Q4_1>::new(&data()?, rows, cols)?),
            GgmlDType::Q5_0 => Box::new(Interleaved::<Q5_0>::new(&data()?, rows, cols)?),
            GgmlDType::Q5_1 => Box::new(Interleaved::<Q5_1>::new(&data()?, rows, cols)?),
            GgmlDType::Q8_0 => Box::new(Interleaved::<Q8_0>::new(&data()?, rows, cols)?),
            GgmlDType::Q4K => Box::new(Blocks::<Q4K>::new(t, rows, cols)?),
            GgmlDType::Q5K => Box::new(Blocks::<Q5K>::new(t, rows, cols)?),
            GgmlDType::Q6K => Box::new(Blocks::<Q6K>::new(t, rows, cols)?),
            other => return Err(Error::Model(format!("no kernel for {other:?}"))),
        };
        Ok(Self { rows, cols, kernel })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(x.apply_op1_no_bwd(self)?)
    }
}

impl<W: WeightBlock> Blocks<W> {
    fn new(t: &QTensor, rows: usize, cols: usize) -> Result<Self, Error> {
        if cols == 0 || !cols.is_multiple_of(QK_K) {
            return Err(Error::Unsupported(format!(
                "{} rows of {cols} values",
                W::NAME
            )));
        }
        let data = t.data()?;
        let expected = rows * cols / QK_K * W::BYTES;
        if data.len() != expected {
            return Err(Error::Model(format!(
                "{} tensor has {} bytes, expected {expected}",
                W::NAME,
                data.len(),
            )));
        }
        let blocks = data.chunks_exact(W::BYTES).map(W::unpack).collect();
        Ok(Self { rows, cols, blocks })
    }

    /// Output row `r` for `N` activation rows at once.
    fn dot_rows<const N: usize>(&self, r: usize, a: [&[ActBlockK]; N], isa: Isa) -> [f32; N] {
        let nb = self.cols / QK_K;
        W::dot(&self.blocks[r * nb..][..nb], a.map(|a| &a[..nb]), isa)
    }
}

impl<W: WeightBlock> Kernel for Blocks<W> {
    fn format(&self) -> &'static str {
        W::NAME
    }

    #[cfg(test)]
    fn dots_for_test(&self, x: &[f32], r: usize, isa: Isa) -> Vec<f32> {
        let nb = self.cols / QK_K;
        let acts = k_quants::quantize_activations_k(x);
        let row = |i: usize| &acts[i * nb..][..nb];
        match acts.len() / nb {
            1 => self.dot_rows(r, [row(0)], isa).to_vec(),
            4 => self
                .dot_rows(r, std::array::from_fn::<_, 4, _>(row), isa)
                .to_vec(),
            8 => self
                .dot_rows(r, std::array::from_fn::<_, 8, _>(row), isa)
                .to_vec(),
            n => panic!("{n} rows"),
        }
    }

    /// `x` `[m, cols]` times this matrix's transpose: `[m, rows]`. Each
    /// output is one row's dot product, computed the same way whatever `m`.
    fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let nb = self.cols / QK_K;
        let acts = k_quants::quantize_activations_k(x);
        let isa = Isa::detect();
        let act_row = |i: usize| &acts[i * nb..][..nb];
        by_weight_rows(self.rows, m, 1, |rows, outputs| {
            // A tile of activation rows stays in cache while this task's
            // weight rows pass over it, rather than every weight row
            // streaming all of a long prompt's activations from memory.
            for tile in (0..m).step_by(ACTIVATION_TILE) {
                let end = (tile + ACTIVATION_TILE).min(m);
                for r in rows.clone() {
                    // Up to eight activation rows share each unpacked weight block.
                    let mut i = tile;
                    while i + 8 <= end {
                        let a: [&[ActBlockK]; 8] = std::array::from_fn(|k| act_row(i + k));
                        outputs.put_row(r, i, &self.dot_rows(r, a, isa));
                        i += 8;
                    }
                    if i + 4 <= end {
                        let a: [&[ActBlockK]; 4] = std::array::from_fn(|k| act_row(i + k));
                        outputs.put_row(r, i, &self.dot_rows(r, a, isa));
                        i += 4;
                    }
                    for i in i..end {
                        outputs.put_row(r, i, &self.dot_rows(r, [act_row(i)], isa));
                    }
                }
            }
        })
    }
}

/// Activation rows per cache tile of a matmul (a multiple of 8, so the
/// eight-row groups are the same as without tiling): 256 rows of 1536
/// columns are about 480 KB of quantized blocks, within a core's L2.
pub(crate) const ACTIVATION_TILE: usize = 256;

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
            |x, m| self.kernel.matmul(x, m),
        )
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
pub(crate) enum Isa {
    /// AVX-512 with VNNI: one 512-bit instruction per byte dot product for
    /// the 32-value formats, and for Q5_K and Q6_K, eight activation rows
    /// at a time, byte pairs to i16 and scaled i16 pairs into i32, 64
    /// values at a time (other K-quant dots run the AVX2 build, faster
    /// there: see `k_quants`' dispatch).
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
            // F16C widens the 32-value formats' f16 scales.
            let avx2 = has_avx2() && has!("f16c");
            let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            if avx2 && avx512 && has!("avx512vnni") {
                return Isa::Avx512Vnni;
            }
            if avx2 {
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

#[cfg(test)]
mod tests;
