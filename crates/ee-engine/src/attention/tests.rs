//! The attention kernel against plain attention, candle's reference
//! path, itself in other chunks, builds and caches, and its exp.

use super::*;
use crate::KvCacheDtype;

/// Plain causal attention, one row at a time, as the definition reads.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (n_head, n_kv, n, total, hd): (usize, usize, usize, usize, usize),
    window: Option<usize>,
) -> Vec<f32> {
    let mut out = vec![0f32; n * n_head * hd];
    for h in 0..n_head {
        let kv = h / (n_head / n_kv);
        for i in 0..n {
            let pos = total - n + i;
            let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let qi = &q[(h * n + i) * hd..][..hd];
            let scores: Vec<f64> = (start..=pos)
                .map(|j| {
                    let kj = &k[(kv * total + j) * hd..][..hd];
                    qi.iter()
                        .zip(kj)
                        .map(|(a, b)| f64::from(a * b))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            for (e, j) in exps.iter().zip(start..=pos) {
                let vj = &v[(kv * total + j) * hd..][..hd];
                for d in 0..hd {
                    out[(i * n_head + h) * hd + d] += (e / sum * f64::from(vj[d])) as f32;
                }
            }
        }
    }
    out
}

/// Runs `f` on an f32 cache holding `k`, `v` (`[n_kv, total, hd]`).
fn with_cache<T>(k: &Tensor, v: &Tensor, f: impl FnOnce(&LayerView<'_>) -> T) -> T {
    with_cache_of(KvCacheDtype::F32, k, v, f)
}

/// Runs `f` on a cache of `dtype` holding `k`, `v`.
fn with_cache_of<T>(
    dtype: KvCacheDtype,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&LayerView<'_>) -> T,
) -> T {
    let mut cache = crate::KvCache::new(1, 1 << 20, dtype);
    f(&cache.append(0, k, v).unwrap())
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// A tensor of [`values`] in `shape`.
fn tensor(seed: u32, shape: (usize, usize, usize)) -> Tensor {
    Tensor::from_vec(
        values(shape.0 * shape.1 * shape.2, seed),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn matches_plain_attention_for_prefill_decode_gqa_and_windows() {
    // (n_head, n_kv, n new, total, head_dim, window)
    for (n_head, n_kv, n, total, hd, window) in [
        (4, 2, 37, 37, 64, None),
        (4, 2, 37, 200, 64, None),
        (3, 1, 1, 150, 64, None),
        (2, 2, 70, 130, 32, Some(50)),
        (2, 1, 1, 300, 16, Some(64)),
        (6, 3, 5, 5, 64, None),
        (2, 1, 9, 75, 40, Some(33)),
    ] {
        let q = values(n_head * n * hd, 1);
        let k = values(n_kv * total * hd, 2);
        let v = values(n_kv * total * hd, 3);
        let t = |data: &[f32], shape: (usize, usize, usize)| {
            Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
        };
        let (kt, vt) = (t(&k, (n_kv, total, hd)), t(&v, (n_kv, total, hd)));
        let ours = with_cache(&kt, &vt, |c| attention(&t(&q, (n_head, n, hd)), c, window))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = reference(&q, &k, &v, (n_head, n_kv, n, total, hd), window);
        let worst = ours
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst < 1e-5,
            "{n_head} {n_kv} {n} {total} {hd} {window:?}: {worst}"
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_simd_and_portable_builds_give_the_same_bits() {
    if !has_avx2_f16c() {
        return;
    }
    // 40 dimensions: 32 (or 16 + 16) shared by four rows, then 8 one by one.
    let (hd, total, n) = (40, 150, 20);
    let (k, v) = (tensor(10, (1, total, hd)), tensor(11, (1, total, hd)));
    let q = values(n * hd, 12);
    let shape = Shape {
        head_dim: hd,
        group: 1,
        first_pos: total - n,
        sliding_window: Some(70),
        scale: 1.0 / (hd as f32).sqrt(),
    };
    for dtype in [KvCacheDtype::F16, KvCacheDtype::F32] {
        with_cache_of(dtype, &k, &v, |c| match (c.keys, c.values) {
            (KvSlice::F16(keys), KvSlice::F16(values)) => {
                every_build_alike(&shape, &Head { keys, values }, &q)
            }
            (KvSlice::F32(keys), KvSlice::F32(values)) => {
                every_build_alike(&shape, &Head { keys, values }, &q)
            }
            _ => unreachable!("one type"),
        });
    }
}

/// Asserts that the AVX2 and AVX-512 builds give the portable one's bits.
#[cfg(target_arch = "x86_64")]
fn every_build_alike<E: crate::float::Widen>(shape: &Shape, head: &Head<'_, E>, q: &[f32]) {
    let mut portable = vec![0f32; q.len()];
    attend_tile_portable::<E, false, false>(shape, head, 0, q, &mut portable);
    let mut avx2 = vec![0f32; q.len()];
    // SAFETY: the caller checked AVX2, FMA and F16C.
    unsafe { attend_tile_avx2(shape, head, 0, q, &mut avx2) };
    assert_eq!(avx2, portable);
    if std::arch::is_x86_feature_detected!("avx512f") {
        let mut avx512 = vec![0f32; q.len()];
        // SAFETY: the CPU reports AVX-512F too.
        unsafe { attend_tile_avx512(shape, head, 0, q, &mut avx512) };
        assert_eq!(avx512, portable);
    }
}

#[test]
fn an_f16_cache_attends_exactly_as_f32_over_its_rounded_keys_and_values() {
    // (n_head, n_kv, n new, total, head_dim, window)
    for (n_head, n_kv, n, total, hd, window) in [
        (4, 2, 37, 200, 64, None),
        (3, 1, 1, 150, 64, None),
        (2, 1, 9, 75, 40, Some(33)),
    ] {
        let q = tensor(1, (n_head, n, hd));
        let scaled = |seed, by: f64| (tensor(seed, (n_kv, total, hd)) * by).unwrap();
        // Ordinary values; values under f16's normal numbers (subnormal or
        // zero once rounded), with a finite answer; keys past f16's range
        // (infinite once rounded: NaN scores, in both alike).
        for (k, v, finite) in [
            (scaled(2, 1.0), scaled(3, 1.0), true),
            (scaled(2, 1.0), scaled(3, 1e-5), true),
            (scaled(2, 1e5), scaled(3, 1.0), false),
        ] {
            let f16 = with_cache_of(KvCacheDtype::F16, &k, &v, |c| attention(&q, c, window));
            let round = |t: &Tensor| {
                t.to_dtype(candle_core::DType::F16)
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
            };
            let f32 = with_cache(&round(&k), &round(&v), |c| attention(&q, c, window));
            let bits = |t: Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.into_iter().map(f32::to_bits).collect()
            };
            let (f16, f32) = (bits(f16.unwrap()), bits(f32.unwrap()));
            assert_eq!(f16, f32, "{n} {total} {hd}");
            let all_finite = f16.iter().all(|&b| f32::from_bits(b).is_finite());
            assert_eq!(all_finite, finite, "{n} {total} {hd}");
        }
    }
}

#[test]
fn the_fast_exp_is_within_a_few_ulp() {
    let mut worst = 0f32;
    for i in 0..=870_000 {
        let x = -(i as f32) / 10_000.0;
        let (ours, libm) = (exp(x), x.exp());
        worst = worst.max((ours - libm).abs() / libm);
    }
    assert!(worst < 4e-7, "relative error {worst}");
    assert_eq!(exp(0.0), 1.0);
    assert!(exp(-1e30) >= 0.0 && exp(-1e30) < 1e-37);
    assert!(exp(f32::NAN).is_nan());
}

#[test]
fn the_reference_path_computes_the_same_attention() {
    let (n_head, n_kv, n, total, hd) = (4, 2, 20, 100, 64);
    let (q, k, v) = (
        tensor(7, (n_head, n, hd)),
        tensor(8, (n_kv, total, hd)),
        tensor(9, (n_kv, total, hd)),
    );
    for window in [None, Some(30)] {
        let (a, b) = with_cache(&k, &v, |c| {
            (
                attention(&q, c, window).unwrap(),
                reference_attention(&q, c, window).unwrap(),
            )
        });
        let worst = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(worst.to_scalar::<f32>().unwrap() < 1e-5, "{window:?}");
    }
}

#[test]
fn a_row_has_the_same_bits_in_any_chunk_window_or_cache_history() {
    let (n_head, n_kv, total, hd) = (2, 1, 90, 64);
    let k = tensor(5, (n_kv, total, hd));
    let v = tensor(6, (n_kv, total, hd));
    let q_all = tensor(4, (n_head, total, hd));
    for window in [None, Some(40)] {
        let whole = with_cache(&k, &v, |c| attention(&q_all, c, window)).unwrap();
        // The last 7 rows as a chunk of their own, and the last row alone.
        for n in [7, 1] {
            let q_tail = q_all.narrow(1, total - n, n).unwrap();
            let part = with_cache(&k, &v, |c| attention(&q_tail, c, window)).unwrap();
            let expected = whole.narrow(0, total - n, n).unwrap();
            assert_eq!(
                part.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                expected.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        // The last row again, from a cache filled a token at a time
        // through several reallocations.
        let mut cache = crate::KvCache::new(1, total, crate::KvCacheDtype::F32);
        for p in 0..total - 1 {
            let one = |t: &Tensor| t.narrow(1, p, 1).unwrap();
            cache.append(0, &one(&k), &one(&v)).unwrap();
            cache.advance(1);
        }
        let last = |t: &Tensor| t.narrow(1, total - 1, 1).unwrap();
        let view = cache.append(0, &last(&k), &last(&v)).unwrap();
        let alone = attention(&last(&q_all), &view, window).unwrap();
        assert_eq!(
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            whole
                .narrow(0, total - 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
    // What cannot be computed is an error, not a panic.
    with_cache(&k, &v, |c| {
        assert!(attention(&q_all.narrow(1, 0, 0).unwrap(), c, None).is_err());
        assert!(attention(&q_all, c, Some(0)).is_err());
    });
}
