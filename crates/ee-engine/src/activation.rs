//! The elementwise maths of the forward pass: SwiGLU, the gated FFN's
//! activation, and the `exp` it shares with attention's softmax.
//!
//! candle's `silu` calls libm's `expf` once per value, which took about 4%
//! of a 512-token prefill; this one vectorizes and runs on every core.
//! Each value is computed on its own, so a value's bits depend neither on
//! the batch nor on the order of the channels (a hidden-tier key moves FFN
//! channels).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Error;

/// Values per parallel task.
const TASK_VALUES: usize = 16 * 1024;

/// `silu(gate) · up`, elementwise (Llama's and Mistral's FFN, Shazeer 2020,
/// "GLU Variants Improve Transformer"): `silu(x) = x · σ(x)`. `gate` and
/// `up` are contiguous f32 tensors of one shape; so is the result. Within
/// a few ulp of candle's `silu(gate) * up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor, Error> {
    Ok(gate.apply_op2_no_bwd(up, &SwiGlu)?)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "ee-swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else {
            candle_core::bail!("swiglu takes f32 tensors");
        };
        let (Some((g0, g1)), Some((u0, u1))) = (
            gate_layout.contiguous_offsets(),
            up_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("swiglu takes contiguous tensors");
        };
        if gate_layout.shape() != up_layout.shape() {
            candle_core::bail!(
                "swiglu of {:?} and {:?}",
                gate_layout.shape(),
                up_layout.shape()
            );
        }
        let (gate, up) = (&gate[g0..g1], &up[u0..u1]);
        let mut out = vec![0f32; gate.len()];
        out.par_chunks_mut(TASK_VALUES)
            .zip(gate.par_chunks(TASK_VALUES).zip(up.par_chunks(TASK_VALUES)))
            .for_each(|(out, (gate, up))| swiglu_slice(out, gate, up));
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

fn swiglu_slice(out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { swiglu_slice_avx2(out, gate, up) };
    }
    swiglu_values(out, gate, up)
}

/// The same loop, compiled with AVX2 and FMA so that it vectorizes (the
/// same bits: `mul_add` is one exactly rounded operation either way).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn swiglu_slice_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
    swiglu_values(out, gate, up)
}

#[inline(always)]
fn swiglu_values(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// `x · σ(x)`, with `σ(x) = 1 / (1 + e^-x)` written through `t = e^-|x|`
/// (so `exp` only meets `x <= 0`): `1 / (1 + t)` for `x >= 0`, `t / (1 + t)`
/// below.
#[inline(always)]
fn silu(x: f32) -> f32 {
    let t = exp(-x.abs());
    let numerator = if x >= 0.0 { 1.0 } else { t };
    x * (numerator / (1.0 + t))
}

/// `e^x` for `x <= 0` (a softmax term), in operations that vectorize:
/// Cephes' range reduction to `x = n ln2 + r`, a degree-6 polynomial for
/// `e^r`, and `2^n` built in the exponent bits. Within a few ulp of `exp`
/// (tested); `x` below -87 counts as -87, a term of about 1e-38 beside the
/// block's maximum, which is 1.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Not `max`, which would turn a NaN into a weight: NaN stays NaN.
    let x = if x < -87.0 { -87.0 } else { x };
    let n = (x * LOG2E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p.mul_add(r, c);
    }
    let e_r = p.mul_add(r * r, r) + 1.0;
    // n is a whole number in [-126, 0] (or NaN, and then so is e_r).
    let n = small_whole_as_i32(n) as u32;
    e_r * f32::from_bits(n.wrapping_add(127) << 23)
}

/// `x as i32` for a whole number `x` of magnitude under 2^22, in operations
/// that vectorize: added to 1.5 * 2^23, it is the low bits of the sum's
/// mantissa. (Rust's `as` saturates and maps NaN to 0, which the CPU's
/// conversion does not, so the compiler converts one value at a time.)
/// Anything else (NaN, fractions, larger magnitudes) gives an unspecified
/// number, never undefined behaviour.
#[inline(always)]
pub(crate) fn small_whole_as_i32(x: f32) -> i32 {
    const SHIFTER: f32 = 12_582_912.0;
    (x + SHIFTER).to_bits().wrapping_sub(SHIFTER.to_bits()) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn swiglu_is_within_a_few_ulp_of_candles() {
        let n = 3 * TASK_VALUES + 20; // with the 8 below, rows of 5
        let gate: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.618).fract() - 0.5) * 40.0)
            .chain([0.0, -0.0, 1e-30, -1e-30, 90.0, -90.0, -200.0, 200.0])
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| ((i as f32 * 0.377).fract() - 0.5) * 3.0)
            .collect();
        let shape = (gate.len() / 5, 5);
        let g = Tensor::from_vec(gate.clone(), gate.len(), &Device::Cpu).unwrap();
        let u = Tensor::from_vec(up.clone(), up.len(), &Device::Cpu).unwrap();
        let ours = swiglu(&g.reshape(shape).unwrap(), &u.reshape(shape).unwrap()).unwrap();
        assert_eq!(ours.dims(), &[shape.0, shape.1]);
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let candle = (candle_nn::ops::silu(&g).unwrap() * &u).unwrap();
        let candle = candle.to_vec1::<f32>().unwrap();
        for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
            // Below e^-87 ours flushes to about 1e-38 of the gate; candle's to 0.
            let tolerance = 4.0 * f32::EPSILON * b.abs() + 1e-30;
            assert!(
                (a - b).abs() <= tolerance,
                "{i}: gate {} up {}: {a} vs {b}",
                gate[i],
                up[i]
            );
        }
        // Every build gives the same bits.
        let mut portable = vec![0f32; gate.len()];
        swiglu_values(&mut portable, &gate, &up);
        assert_eq!(portable, ours);
        assert!(swiglu(&g, &u.narrow(0, 0, 4).unwrap()).is_err());
    }

    #[test]
    fn silu_keeps_nan_and_signs() {
        assert!(silu(f32::NAN).is_nan());
        assert_eq!(silu(0.0), 0.0);
        assert_eq!(silu(200.0), 200.0);
        assert!(silu(-200.0) <= 0.0 && silu(-200.0) > -1e-30);
    }
}
