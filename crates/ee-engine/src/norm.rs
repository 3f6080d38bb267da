//! RMSNorm whose sum of squares does not depend on the order of the
//! channels, so a model whose residual channels a hidden-tier key moved
//! normalizes to exactly the same bits (`../shared/docs/ee-design.md`).
//!
//! The formula is candle's and Hugging Face Llama's:
//! `y = x / sqrt(mean(x²) + eps) * weight`, in f32. Only the sum of squares
//! differs: each square (exact in f64) is rounded to a multiple of one
//! power of two `2^q` chosen from the row's largest square, and those
//! multiples are added as integers in f64, which is exact in any order
//! because the total stays below 2^53 · 2^q. That rounding is at most
//! n · 2^(bits(n) − 52) of the sum for n channels: about 2^-33 at 576 and
//! 2^-27 at 4,096, below f32's own rounding and far below that of a sum in f32.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::Error;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm over the last dimension of `x` (f32, `[.., d]`) with `weight`
/// (`[d]`). Errors: other dtypes or a weight of another length.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor, Error> {
    let d = x.dim(candle_core::D::Minus1)?;
    let w = weight.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if w.len() != d || x.dtype() != DType::F32 {
        return Err(Error::Model(format!(
            "RMSNorm of {:?} {:?} with a weight of {}",
            x.dtype(),
            x.dims(),
            w.len()
        )));
    }
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; values.len()];
    if d > 0 {
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(values.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(dst, src)| {
                for (y, x) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)) {
                    let scale = (sum_of_squares(x) / d as f32 + eps).sqrt();
                    for ((y, &x), &w) in y.iter_mut().zip(x).zip(&w) {
                        *y = x / scale * w;
                    }
                }
            });
    }
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// Σx², the same for every order of `x` (see the module doc).
pub fn sum_of_squares(x: &[f32]) -> f32 {
    let largest = x
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .fold(0f64, f64::max);
    if largest == 0.0 || !largest.is_finite() {
        // Zeros; or an overflow or NaN, which no order can save.
        return x.iter().map(|&v| v * v).sum();
    }
    // Every square is below 2^e; with n below 2^bits terms, multiples of
    // 2^q = 2^(e + bits - 52) keep the total under 2^52 of them.
    let e = ((largest.to_bits() >> 52) & 0x7ff) as i32 - 1022;
    let bits = usize::BITS as i32 - x.len().leading_zeros() as i32;
    let q = e + bits - 52;
    let (down, up) = (pow2(-q), pow2(q));
    // Adding and subtracting 1.5 · 2^52 rounds a value below 2^51 to an
    // integer (to nearest), the same one wherever it stands.
    const ROUND: f64 = 6755399441055744.0;
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            let v = f64::from(v);
            *lane += (v * v * down + ROUND) - ROUND;
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        let v = f64::from(v);
        *lane += (v * v * down + ROUND) - ROUND;
    }
    (lanes.iter().sum::<f64>() * up) as f32
}

/// 2^k for the exponents used here (well inside f64's normal range).
fn pow2(k: i32) -> f64 {
    f64::from_bits(((1023 + k) as u64) << 52)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_is_the_same_in_every_order_and_close_to_the_true_one() {
        // Values over many magnitudes, where f32 sums in two orders differ.
        let x: Vec<f32> = (0..576)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 10f32.powi(i % 7 - 3))
            .collect();
        let mut reversed = x.clone();
        reversed.reverse();
        let mut shuffled = x.clone();
        for i in 0..shuffled.len() {
            shuffled.swap(i, i * 31 % 576);
        }
        let plain = |v: &[f32]| v.iter().map(|&a| a * a).sum::<f32>();
        assert_ne!(plain(&x).to_bits(), plain(&reversed).to_bits());
        let s = sum_of_squares(&x);
        assert_eq!(s.to_bits(), sum_of_squares(&reversed).to_bits());
        assert_eq!(s.to_bits(), sum_of_squares(&shuffled).to_bits());
        let exact: f64 = x.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
        assert!(((f64::from(s) - exact) / exact).abs() < 1e-7, "{s} {exact}");
        assert_eq!(sum_of_squares(&[0.0; 5]), 0.0);
        assert_eq!(sum_of_squares(&[3.0]), 9.0);
        assert!(sum_of_squares(&[f32::NAN, 1.0]).is_nan());
        assert!(sum_of_squares(&[f32::MAX, 1.0]).is_infinite());
    }

    #[test]
    fn it_agrees_with_candles_rms_norm() {
        let x: Vec<f32> = (0..3 * 40)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) / 3.0)
            .collect();
        let w: Vec<f32> = (0..40).map(|i| 0.5 + i as f32 / 40.0).collect();
        let dev = candle_core::Device::Cpu;
        let x = Tensor::from_vec(x, (3, 40), &dev).unwrap();
        let w = Tensor::from_vec(w, 40, &dev).unwrap();
        let ours = rms_norm(&x, &w, 1e-5).unwrap().flatten_all().unwrap();
        let theirs = candle_nn::ops::rms_norm(&x, &w, 1e-5)
            .unwrap()
            .flatten_all()
            .unwrap();
        let (a, b) = (
            ours.to_vec1::<f32>().unwrap(),
            theirs.to_vec1::<f32>().unwrap(),
        );
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} {b}");
        }
        let bad = Tensor::zeros(39, DType::F32, &dev).unwrap();
        assert!(rms_norm(&x, &bad, 1e-5).is_err());
    }
}
