//! Float weight matmuls: f32, f16 and bf16 weights kept as stored (a
//! Hugging Face checkpoint's dtype, or a GGUF's F16/F32 matrices), f32
//! activations and accumulation.
//!
//! Weights are repacked in groups of eight rows by pairs of columns, so
//! that one 512-bit vector holds two columns of eight rows: a GEMM
//! micro-kernel multiplies it by a broadcast pair of activations, with no
//! horizontal sums until the end, and widens f16 (F16C) or bf16 (a shift)
//! in registers, as llama.cpp widens and accumulates in f32. bf16 weights
//! do not use AVX-512 BF16's `vdpbf16ps`, which would round activations to
//! bf16: on the CPU measured (a Xeon VM) it does fewer multiply-adds per ns
//! than f32 FMA (`benches/bf16_dot_throughput.rs`).
//!
//! Every output is defined as two fused multiply-add chains over the
//! columns, even and odd, added at the end: the portable, AVX2 and AVX-512
//! builds compute exactly that, whatever the batch, so a sequence's outputs
//! do not depend on what else is in it or on the CPU.

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

/// A float weight matrix `[rows, cols]`, in groups of [`GROUP`] rows and
/// pairs of columns: value `(g·8 + r, k)` at
/// `((g·⌈cols/2⌉ + k/2)·8 + r)·2 + k%2`, so that 16 values hold two
/// columns of eight rows; the last group's missing rows and an odd last
/// column's partner are zeros.
pub struct FloatMatrix {
    rows: usize,
    cols: usize,
    weights: FloatWeights,
}

/// Row-major `[rows, cols]` values in [`FloatMatrix`]'s order.
fn interleave<T: Copy + Default>(w: &[T], rows: usize, cols: usize) -> Vec<T> {
    let (groups, pairs) = (rows.div_ceil(GROUP), cols.div_ceil(2));
    let mut out = vec![T::default(); groups * pairs * 2 * GROUP];
    for (r, row) in w.chunks_exact(cols).enumerate() {
        let (g, lane) = (r / GROUP, r % GROUP);
        for (k, &v) in row.iter().enumerate() {
            out[((g * pairs + k / 2) * GROUP + lane) * 2 + k % 2] = v;
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
        let simd = Simd::detect();
        let group_len = k.div_ceil(2) * 2 * GROUP;
        let group = |g: usize| &w[g * group_len..][..group_len];
        let act = |i: usize| &x[i * k..][..k];
        by_weight_rows(self.rows, m, GROUP, |rows, outputs| {
            let (start, end) = (rows.start, rows.end);
            let mut put = |g, i, outs: &[_]| outputs.put_group::<GROUP>((g, i), outs);
            let groups = start / GROUP..end.div_ceil(GROUP);
            let mut g = groups.start;
            // Decoding: eight groups, then four, share each activation
            // broadcast (eight weight streams in flight: F16 decode 5%
            // faster than four).
            macro_rules! decode {
                ($groups:literal) => {
                    while g + $groups <= groups.end {
                        for i in 0..m {
                            let ws: [&[T]; $groups] = std::array::from_fn(|j| group(g + j));
                            for (j, out) in tile(ws, [act(i)], simd).iter().enumerate() {
                                put(g + j, i, out);
                            }
                        }
                        g += $groups;
                    }
                };
            }
            if m < 4 {
                decode!(8);
                decode!(4);
            }
            // Prompts: eight (AVX-512: one register each) or four
            // activation rows share each weight load, and a tile of
            // activation rows stays in cache while this task's groups pass
            // over it (a long prompt's f32 rows are megabytes).
            for first in (0..m).step_by(ACTIVATION_TILE) {
                let last = (first + ACTIVATION_TILE).min(m);
                // Two groups at a time where two are left: on AVX-512 they
                // share each activation broadcast (16 of the 32 registers
                // accumulate).
                let mut g = g;
                while g < groups.end {
                    let width = if g + 1 < groups.end { 2 } else { 1 };
                    let mut i = first;
                    #[cfg(target_arch = "x86_64")]
                    while simd == Simd::Avx512 && i + 8 <= last {
                        let acts = std::array::from_fn(|n| act(i + n));
                        if width == 2 {
                            let [a, b] = tile::<T, 2, 8>([group(g), group(g + 1)], acts, simd);
                            put(g, i, &a);
                            put(g + 1, i, &b);
                        } else {
                            let [out] = tile::<T, 1, 8>([group(g)], acts, simd);
                            put(g, i, &out);
                        }
                        i += 8;
                    }
                    for g in g..g + width {
                        let mut i = i;
                        while i + 4 <= last {
                            let acts = std::array::from_fn(|n| act(i + n));
                            let [out] = tile::<T, 1, 4>([group(g)], acts, simd);
                            put(g, i, &out);
                            i += 4;
                        }
                        for i in i..last {
                            let [out] = tile([group(g)], [act(i)], simd);
                            put(g, i, &out);
                        }
                    }
                    g += width;
                }
            }
        })
    }
}

/// Activation rows per cache tile (a multiple of 8): 64 rows of 1536 f32
/// columns are 384 KB, within a core's L2.
const ACTIVATION_TILE: usize = 64;

/// The builds of the micro-kernel, best first.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Simd {
    /// 512-bit: sixteen lanes, one group of rows by a pair of columns.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// 256-bit: two registers per group and column pair.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Simd {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if crate::quant::has_avx2() && has!("f16c") {
                return if has!("avx512f") {
                    Simd::Avx512
                } else {
                    Simd::Avx2
                };
            }
        }
        Simd::Portable
    }
}

/// A stored float type widened to f32, one value or (x86) 8 or 16 at once:
/// the weights of this module, and an f16 KV cache's elements (attention).
pub(crate) trait Widen: Copy + Default + Send + Sync {
    fn to_f32(self) -> f32;
    /// Eight values from `p`.
    ///
    /// # Safety
    /// `p` must point at eight readable values; the CPU must have AVX2 and
    /// F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen values from `p`.
    ///
    /// # Safety
    /// `p` must point at sixteen readable values; the CPU must have
    /// AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
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
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
}

impl Widen for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    // bf16 is the top half of an f32.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16))
    }
}

/// Group outputs: `[R groups][N activation rows][8 rows]`.
type Tile<const R: usize, const N: usize> = [[[f32; GROUP]; N]; R];

/// The outputs of `R` groups (eight rows each) for `N` activation rows.
fn tile<T: Widen, const R: usize, const N: usize>(
    w: [&[T]; R],
    x: [&[f32]; N],
    simd: Simd,
) -> Tile<R, N> {
    // SAFETY: `simd` names instructions the CPU reports (`Simd::detect`).
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { tile_avx512(w, x) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { tile_avx2(w, x) },
        Simd::Portable => tile_portable(w, x),
    }
}

/// The definition: per output, fused chains over even and odd columns
/// (an odd last column pairs with a zero weight and a zero activation),
/// added at the end.
fn tile_portable<T: Widen, const R: usize, const N: usize>(
    w: [&[T]; R],
    x: [&[f32]; N],
) -> Tile<R, N> {
    let pairs = x[0].len().div_ceil(2);
    w.map(|w| {
        x.map(|x| {
            std::array::from_fn(|lane| {
                let mut chains = [0f32; 2];
                for p in 0..pairs {
                    for (c, chain) in chains.iter_mut().enumerate() {
                        let wk = w[(p * GROUP + lane) * 2 + c].to_f32();
                        let xk = x.get(2 * p + c).copied().unwrap_or(0.0);
                        *chain = wk.mul_add(xk, *chain);
                    }
                }
                chains[0] + chains[1]
            })
        })
    })
}

/// Activations `x[2p]` and `x[2p + 1]` (or 0 past the end) as one 64-bit
/// word, to broadcast to every (even, odd) lane pair: one 8-byte load for
/// a whole pair.
#[inline(always)]
fn pair_bits(x: &[f32], p: usize) -> i64 {
    match x.get(2 * p..2 * p + 2) {
        Some(&[even, odd]) => (u64::from(even.to_bits()) | u64::from(odd.to_bits()) << 32) as i64,
        _ => x.get(2 * p).map_or(0, |even| i64::from(even.to_bits())),
    }
}

/// Each row's even and odd chains, from `lanes` (`2r`, `2r + 1`), added.
#[inline(always)]
fn fold(lanes: &[f32; 2 * GROUP]) -> [f32; GROUP] {
    std::array::from_fn(|r| lanes[2 * r] + lanes[2 * r + 1])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<T: Widen, const R: usize, const N: usize>(
    w: [&[T]; R],
    x: [&[f32]; N],
) -> Tile<R, N> {
    use std::arch::x86_64::*;
    let pairs = x[0].len().div_ceil(2);
    assert!(w.iter().all(|w| w.len() >= pairs * 2 * GROUP));
    assert!(x.iter().all(|v| v.len() == x[0].len()));
    // acc[j][n]: rows 0..4 and 4..8 of group j, lanes (even, odd) per row.
    let mut acc = [[[_mm256_setzero_ps(); 2]; N]; R];
    for p in 0..pairs {
        // SAFETY: p < pairs, and each group holds `pairs` pairs (above).
        let ws: [[__m256; 2]; R] = std::array::from_fn(|j| {
            let at = w[j].as_ptr().add(p * 2 * GROUP);
            [T::load8(at), T::load8(at.add(GROUP))]
        });
        for (n, x) in x.iter().enumerate() {
            let xb = _mm256_castsi256_ps(_mm256_set1_epi64x(pair_bits(x, p)));
            for (j, [lo, hi]) in ws.iter().enumerate() {
                let [a_lo, a_hi] = &mut acc[j][n];
                *a_lo = _mm256_fmadd_ps(*lo, xb, *a_lo);
                *a_hi = _mm256_fmadd_ps(*hi, xb, *a_hi);
            }
        }
    }
    acc.map(|a| {
        a.map(|[lo, hi]| {
            let mut lanes = [0f32; 2 * GROUP];
            _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(GROUP), hi);
            fold(&lanes)
        })
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn tile_avx512<T: Widen, const R: usize, const N: usize>(
    w: [&[T]; R],
    x: [&[f32]; N],
) -> Tile<R, N> {
    use std::arch::x86_64::*;
    let pairs = x[0].len().div_ceil(2);
    assert!(w.iter().all(|w| w.len() >= pairs * 2 * GROUP));
    assert!(x.iter().all(|v| v.len() == x[0].len()));
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    for p in 0..pairs {
        // SAFETY: as in `tile_avx2`.
        let ws: [__m512; R] = std::array::from_fn(|j| T::load16(w[j].as_ptr().add(p * 2 * GROUP)));
        for (n, x) in x.iter().enumerate() {
            let xb = _mm512_castsi512_ps(_mm512_set1_epi64(pair_bits(x, p)));
            for (j, &wv) in ws.iter().enumerate() {
                acc[j][n] = _mm512_fmadd_ps(wv, xb, acc[j][n]);
            }
        }
    }
    acc.map(|a| {
        a.map(|v| {
            let mut lanes = [0f32; 2 * GROUP];
            _mm512_storeu_ps(lanes.as_mut_ptr(), v);
            fold(&lanes)
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
    fn decoding_and_prompt_paths_give_the_same_bits() {
        // 835 rows on two threads: tasks of 104 rows (13 groups) and a last
        // one of 3, so one activation row takes the eight- and
        // four-groups-at-once paths and single groups; 17 rows take the
        // prompt path's eights (on AVX-512, pairs of groups from odd and
        // even first groups, and single ones), fours and ones.
        let (rows, cols, m) = (835, 37, 17);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let w: Vec<f16> = (0..rows * cols)
            .map(|i| f16::from_f32(((i * 7919 % 1013) as f32 - 506.0) / 317.0))
            .collect();
        let x: Vec<f32> = (0..m * cols)
            .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 211.0)
            .collect();
        let mat = FloatMatrix::new(rows, cols, FloatWeights::F16(w.clone())).unwrap();
        let all = pool.install(|| mat.matmul(&x, m));
        for i in 0..m {
            let one = pool.install(|| mat.matmul(&x[i * cols..][..cols], 1));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&all[i * rows..][..rows]), "row {i}");
            for (r, &y) in one.iter().enumerate() {
                let want: f32 = (0..cols)
                    .map(|k| w[r * cols + k].to_f32() * x[i * cols + k])
                    .sum();
                assert!((y - want).abs() < 1e-3, "{i},{r}: {y} vs {want}");
            }
        }
    }

    #[test]
    fn every_simd_build_computes_the_portable_definition_bit_for_bit() {
        let builds: Vec<Simd> = match Simd::detect() {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => vec![Simd::Avx512, Simd::Avx2],
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => vec![Simd::Avx2],
            Simd::Portable => return,
        };
        let (rows, cols) = (4 * GROUP, 37);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 317.0)
            .collect();
        let x: Vec<f32> = (0..4 * cols)
            .map(|i| ((i * 104729 % 997) as f32 - 498.0) / 211.0)
            .collect();
        let xs: [&[f32]; 4] = std::array::from_fn(|n| &x[n * cols..][..cols]);
        fn check<T: Widen>(w: Vec<T>, cols: usize, xs: [&[f32]; 4], builds: &[Simd]) {
            let w = interleave(&w, 4 * GROUP, cols);
            let len = cols.div_ceil(2) * 2 * GROUP;
            let gs: [&[T]; 4] = std::array::from_fn(|j| &w[j * len..][..len]);
            let bits = |t: &[[[f32; GROUP]; 4]; 1]| t[0].map(|o| o.map(f32::to_bits));
            let bits_r = |t: &[[[f32; GROUP]; 1]; 4]| t.map(|[o]| o.map(f32::to_bits));
            for &simd in builds {
                assert_eq!(
                    bits_r(&tile(gs, [xs[0]], simd)),
                    bits_r(&tile_portable(gs, [xs[0]])),
                    "{simd:?}, four groups"
                );
                assert_eq!(
                    bits(&tile([gs[1]], xs, simd)),
                    bits(&tile_portable([gs[1]], xs)),
                    "{simd:?}, four activation rows"
                );
            }
        }
        check(w.clone(), cols, xs, &builds);
        check(
            w.iter().map(|&v| f16::from_f32(v)).collect(),
            cols,
            xs,
            &builds,
        );
        check(
            w.iter().map(|&v| bf16::from_f32(v)).collect(),
            cols,
            xs,
            &builds,
        );
    }
}
