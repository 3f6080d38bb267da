use super::legacy::{quantize_activations, quantize_block, ActBlock, BLOCK};
use super::*;
use candle_core::quantized::QMatMul;
use candle_core::{Device, Module};

const FORMATS: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A random quantized matrix (ours and candle's) and activations.
fn setup(dtype: GgmlDType, rows: usize, cols: usize, m: usize) -> (QuantMatrix, QMatMul, Tensor) {
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

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every ISA's outputs for weight row `r` against all of `x`'s rows (1, 4
/// or 8) in one call, best ISA first.
fn dots_by_isa(mat: &QuantMatrix, x: &Tensor, r: usize) -> Vec<(Isa, Vec<f32>)> {
    let flat = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Isa::available()
        .into_iter()
        .map(|isa| (isa, mat.kernel.dots_for_test(&flat, r, isa)))
        .collect()
}

#[test]
fn matches_candles_kernels_to_rounding() {
    for dtype in FORMATS {
        // 61 rows: the last group of eight is padded.
        let (ours, theirs, x) = setup(
            dtype,
            61,
            if dtype.block_size() == 32 { 320 } else { 512 },
            5,
        );
        assert!(ours.format().replace('_', "") == format!("{dtype:?}").replace('_', ""));
        let (a, b) = (ours.forward(&x).unwrap(), theirs.forward(&x).unwrap());
        let diff = max_abs(&(a - &b).unwrap());
        assert!(diff <= 1e-5 * max_abs(&b), "{dtype:?}: diff {diff}");
    }
}

#[test]
fn simd_kernels_agree_with_the_portable_one_and_each_other() {
    for dtype in FORMATS {
        let (mat, _, x) = setup(dtype, 5, 512, 1);
        for r in 0..5 {
            let results = dots_by_isa(&mat, &x, r);
            let (portable, simd) = results.split_last().unwrap();
            assert_eq!(portable.0, Isa::Portable);
            let p = portable.1[0];
            for (isa, v) in simd {
                assert!(
                    (v[0] - p).abs() <= 1e-4 * p.abs().max(1.0),
                    "{dtype:?} {isa:?}: {} vs {p}",
                    v[0]
                );
                assert_eq!(
                    v[0].to_bits(),
                    simd[0].1[0].to_bits(),
                    "{dtype:?}: SIMD kernels differ"
                );
                // Every build computes the portable definition exactly.
                assert_eq!(v[0].to_bits(), p.to_bits(), "{dtype:?} {isa:?} vs portable");
            }
        }
    }
}

#[test]
fn rounding_to_eight_bits_is_rusts_saturating_cast() {
    let specials = [
        0.5, -0.5, 1.5, -2.5, 126.5, 127.49, 127.5, -128.5, -129.0, 1e9, -1e9,
    ];
    let specials = specials.into_iter().chain([
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -0.0,
        f32::MIN_POSITIVE,
    ]);
    let steps = (-1400..=1400).map(|i| i as f32 / 10.0 + 0.05);
    for x in specials.chain(steps) {
        assert_eq!(round_to_i8(x), x.round() as i8, "{x}");
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
    let key = |b: &ActBlock| (b.d.to_bits(), b.s.to_bits(), b.q);
    let fast: Vec<_> = quantize_activations(&x).iter().map(key).collect();
    let plain: Vec<_> = x
        .chunks_exact(BLOCK)
        .map(|b| key(&quantize_block(b)))
        .collect();
    assert_eq!(fast, plain);
    // Q8_K: a negative extreme maps to -128; halves round away from zero.
    x[300] = -400.0;
    let key = |b: &ActBlockK| (b.d.to_bits(), b.q, b.bsums);
    let fast: Vec<_> = k_quants::quantize_activations_k(&x)
        .iter()
        .map(key)
        .collect();
    let plain: Vec<_> = x
        .chunks_exact(k_quants::QK_K)
        .map(|b| key(&k_quants::quantize_block_k(b)))
        .collect();
    assert_eq!(fast, plain);
    assert_eq!(fast[1].1[300 - 256], -128);
}

#[test]
fn four_or_eight_activation_rows_at_once_are_bit_identical_to_one() {
    for dtype in FORMATS {
        let (mat, _, x) = setup(dtype, 3, 512, 8);
        for r in 0..3 {
            let by_isa = |rows: Tensor| dots_by_isa(&mat, &rows, r);
            let ones: Vec<_> = (0..8).map(|i| by_isa(x.narrow(0, i, 1).unwrap())).collect();
            let fours = [
                by_isa(x.narrow(0, 0, 4).unwrap()),
                by_isa(x.narrow(0, 4, 4).unwrap()),
            ];
            for (k, (isa, eight)) in by_isa(x.clone()).into_iter().enumerate() {
                let one: Vec<u32> = ones.iter().map(|o| o[k].1[0].to_bits()).collect();
                assert_eq!(bits(&eight), one, "{dtype:?} {isa:?}");
                let four: Vec<u32> = fours.iter().flat_map(|f| bits(&f[k].1)).collect();
                assert_eq!(four, one, "{dtype:?} {isa:?}");
            }
        }
    }
}

#[test]
fn rows_are_independent_of_the_batch() {
    for dtype in FORMATS {
        let (mat, _, x) = setup(dtype, 40, 256, 13);
        let all = mat.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in all.iter().enumerate() {
            let one = mat
                .forward(&x.narrow(0, i, 1).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            assert_eq!(bits(&one[0]), bits(row), "{dtype:?} row {i}");
        }
    }
}

#[test]
fn other_formats_and_bad_shapes_are_refused() {
    let w = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu).unwrap();
    let q2k = QTensor::quantize(&w, GgmlDType::Q2K).unwrap();
    assert!(QuantMatrix::from_qtensor(&q2k).is_err());
    let (mat, _, _) = setup(GgmlDType::Q8_0, 4, 64, 1);
    let wrong = Tensor::zeros((1, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(mat.forward(&wrong).is_err());
}

/// The stored weights, dequantized, and the activations, as rows.
fn as_rows(q: &QTensor, x: &Tensor) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let w = q.dequantize(&Device::Cpu).unwrap();
    (w.to_vec2().unwrap(), x.to_vec2().unwrap())
}

/// `x · dequant(w)ᵀ` in f64: the exact product of the stored weights.
fn dequantized_matmul(q: &QTensor, x: &Tensor) -> Vec<Vec<f64>> {
    let (w, x) = as_rows(q, x);
    x.iter()
        .map(|x| {
            w.iter()
                .map(|w| {
                    w.iter()
                        .zip(x)
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum()
                })
                .collect()
        })
        .collect()
}

/// What rounding activations to 8 bits may change in each output of
/// `x · dequant(w)ᵀ`, as ggml rounds them: a value moves by at most half its
/// block's step `d` (the block's largest magnitude over 127) plus 127 times
/// the rounding of `d` to f16 (2^-11 of it), so an output by at most
/// `Σ_j |w_j| · 0.562 d_j`; the formats with a minimum (Q4_1, Q5_1) add it
/// times the block's sum, rounded to f16 twice (2^-10 of it, with `|min|`
/// at most the block's largest weight); plus 1e-5 of `Σ_j |w_j x_j|` for
/// the f32 sums. Also returns what the rounding is expected to change, as
/// a variance: `Σ_j w_j² d_j² / 12` (each value's rounding error uniform
/// over a step).
fn rounding_bounds(q: &QTensor, x: &Tensor) -> Vec<Vec<(f64, f64)>> {
    let has_min = matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q5_1);
    let (w, x) = as_rows(q, x);
    let amax = |v: &[f32]| f64::from(v.iter().fold(0f32, |m, v| m.max(v.abs())));
    x.iter()
        .map(|x| {
            w.iter()
                .map(|w| {
                    let (mut bound, mut variance) = (0f64, 0f64);
                    for (wb, xb) in w.chunks(32).zip(x.chunks(32)) {
                        let step = amax(xb) / 127.0;
                        let moved = step * (0.5 + 127.0 / 2048.0);
                        for (&wj, &xj) in wb.iter().zip(xb) {
                            let wj = f64::from(wj);
                            bound += wj.abs() * (moved + f64::from(xj.abs()) * 1e-5);
                            variance += wj * wj * step * step / 12.0;
                        }
                        if has_min {
                            let sum: f64 = xb.iter().map(|&v| f64::from(v)).sum();
                            bound += amax(wb) * (sum.abs() + 32.0 * moved) / 1024.0;
                        }
                    }
                    (bound, variance)
                })
                .collect()
        })
        .collect()
}

#[test]
fn odd_block_counts_and_long_prompts_match_the_dequantized_product() {
    // Nine blocks a row (candle's kernels refuse odd counts for some of
    // these), 300 activation rows (past one 256-row cache tile), 19 weight
    // rows (a padded group).
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        let w = Tensor::randn(0f32, 1.0, (19, 288), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (300, 288), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let mat = QuantMatrix::from_qtensor(&q).unwrap();
        let ours = mat.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let exact = dequantized_matmul(&q, &x);
        let bounds = rounding_bounds(&q, &x);
        let (mut squared_errors, mut variances) = (0f64, 0f64);
        for (i, ((ours, exact), bounds)) in ours.iter().zip(&exact).zip(&bounds).enumerate() {
            for ((&a, &b), &(bound, variance)) in ours.iter().zip(exact).zip(bounds) {
                let error = f64::from(a) - b;
                assert!(
                    error.abs() <= bound,
                    "{dtype:?} row {i}: {a} vs {b} (bound {bound})"
                );
                squared_errors += error * error;
                variances += variance;
            }
        }
        // Over 5,700 outputs the errors' RMS is close to what uniform
        // rounding gives (measured: 0.98 to 0.99 times); a kernel that
        // truncated, or lost a block's low bits, would be well over twice.
        let ratio = (squared_errors / variances).sqrt();
        assert!(
            ratio <= 2.0,
            "{dtype:?}: RMS error {ratio} times the expected"
        );
        let last = mat
            .forward(&x.narrow(0, 299, 1).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(bits(&last[0]), bits(&ours[299]), "{dtype:?}");
    }
}

/// The hidden tier moves quantized codes among the values that share a
/// scale (`ee_core::gguf::blocks`): checked against candle's own
/// dequantization, every format's block then holds the same values, moved
/// exactly as the permutation says.
#[test]
fn codes_moved_within_their_runs_dequantize_to_the_values_moved() {
    use crate::weights::gguf::ggml_type_id;
    use candle_core::quantized::ggml_file::qtensor_from_ggml;
    use ee_core::gguf::blocks::{move_within, run_values};
    let (rows, cols) = (2, 512);
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
        .collect();
    let t = Tensor::from_vec(x, (rows, cols), &Device::Cpu).unwrap();
    for dtype in FORMATS {
        let id = ggml_type_id(dtype);
        let run = run_values(id).unwrap();
        let (block, bytes) = (dtype.block_size(), dtype.type_size());
        let q = QTensor::quantize(&t, dtype).unwrap();
        let src = q.data().unwrap().into_owned();
        // Each run reversed, then rotated by its index: every value moves.
        let to: Vec<u32> = (0..block)
            .map(|j| {
                let (r, k) = (j / run, j % run);
                (r * run + (run - 1 - k + r) % run) as u32
            })
            .collect();
        let mut moved = vec![0u8; src.len()];
        for (from, at) in src.chunks_exact(bytes).zip(moved.chunks_exact_mut(bytes)) {
            move_within(id, from, &to, at).unwrap();
        }
        let values = |b: &[u8]| {
            qtensor_from_ggml(dtype, b, vec![rows, cols], &Device::Cpu)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (before, after) = (values(&src), values(&moved));
        for (i, &v) in before.iter().enumerate() {
            let (b, j) = (i / block, i % block);
            let there = after[b * block + to[j] as usize];
            assert_eq!(v.to_bits(), there.to_bits(), "{dtype:?}: value {i}");
        }
    }
}

/// The Q8_K activation scale takes the negative value where a positive and
/// a negative one tie for the largest magnitude, so the order of a block's
/// values never changes it.
#[test]
fn the_q8k_scale_does_not_depend_on_the_order_of_a_tie() {
    use super::k_quants::quantize_block_k;
    let mut x: Vec<f32> = (0..256).map(|i| (i % 17) as f32 / 20.0 - 0.4).collect();
    (x[3], x[200]) = (2.0, -2.0);
    let a = quantize_block_k(&x);
    x.swap(3, 200);
    let b = quantize_block_k(&x);
    assert_eq!(a.d.to_bits(), b.d.to_bits());
    assert_eq!((a.q[3], a.q[200]), (b.q[200], b.q[3]));
    assert_eq!(a.q[..3], b.q[..3]);
}
