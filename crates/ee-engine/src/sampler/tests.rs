use super::*;
use ee_core::Key;

fn keys(n: usize) -> Vec<u64> {
    (0..n as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect()
}

fn random_logits(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (uniform_below(&mut rng, 10_000) as f32) / 1000.0)
        .collect()
}

#[test]
fn greedy_picks_the_max_and_breaks_ties_by_key() {
    let mut s = Sampler::new(SamplingParams::greedy(), &[]).unwrap();
    assert_eq!(s.sample(&[0.1, 3.0, 2.0], &keys(3), None).unwrap().token, 1);
    let tie = [1.0, 5.0, 5.0];
    let t = s.sample(&tie, &[0, 1, 2], None).unwrap().token;
    assert_eq!(t, 2, "tie goes to the larger key");
    assert_eq!(s.sample(&tie, &[0, 2, 1], None).unwrap().token, 1);
}

#[test]
fn a_first_token_mask_binds_the_first_draw_only_and_moves_with_the_key() {
    let n = 300;
    let perm = Key::from_bytes([5; 32]).vocab_permutation(n as u32);
    let mut allowed = TokenMask::empty(n);
    for t in [4, 90, 211] {
        allowed.insert(t);
    }
    let enc_allowed = allowed.permuted(&perm).unwrap();
    for (seed, temperature) in [(1, 0.0), (2, 0.9), (3, 1.5)] {
        let params = |mask: &TokenMask| SamplingParams {
            temperature,
            seed: Some(seed),
            first_token_mask: Some(Arc::new(mask.clone())),
            ..Default::default()
        };
        let mut plain = Sampler::new(params(&allowed), &[]).unwrap();
        let mut enc = Sampler::new(params(&enc_allowed), &[]).unwrap();
        let plain_keys = keys(n);
        let enc_keys = perm.scatter(&plain_keys).unwrap();
        let mut outside = 0;
        for step in 0..20 {
            let logits = random_logits(n, seed * 1000 + step);
            let enc_logits = perm.scatter(&logits).unwrap();
            let a = plain.sample(&logits, &plain_keys, Some(5)).unwrap();
            if step == 0 {
                // Alternatives are the allowed tokens only, all finite.
                let top = a.logprobs.as_ref().unwrap().top.clone();
                assert_eq!(top.len(), 3, "{top:?}");
                assert!(top.iter().all(|t| t.1.is_finite()), "{top:?}");
            }
            let a = a.token;
            let b = enc.sample(&enc_logits, &enc_keys, None).unwrap().token;
            assert_eq!(perm.decrypt(b).unwrap(), a, "seed {seed} step {step}");
            if step == 0 {
                assert!(allowed.contains(a), "the first draw {a} is masked out");
            } else if !allowed.contains(a) {
                outside += 1;
            }
        }
        assert!(
            outside > 10,
            "later draws are free: {outside} of 19 outside"
        );
    }
}

#[test]
fn seeded_sampling_is_permutation_equivariant() {
    let n = 500;
    let perm = Key::from_bytes([3; 32]).vocab_permutation(n as u32);
    for (i, params) in [
        SamplingParams {
            temperature: 0.8,
            seed: Some(1),
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_k: 20,
            seed: Some(2),
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            min_p: 0.05,
            seed: Some(3),
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.4,
            seed: Some(4),
            ..Default::default()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let prompt = [3u32, 7, 7, 9];
        let enc_prompt = perm.encrypt_all(&prompt).unwrap();
        let enc_params = SamplingParams {
            logit_bias: vec![(perm.encrypt(5).unwrap(), 2.0)],
            ..params.clone()
        };
        let params = SamplingParams {
            logit_bias: vec![(5, 2.0)],
            ..params
        };
        let mut plain = Sampler::new(params, &prompt).unwrap();
        let mut enc = Sampler::new(enc_params, &enc_prompt).unwrap();
        let plain_keys = keys(n);
        let enc_keys = perm.scatter(&plain_keys).unwrap();
        for step in 0..50 {
            let logits = random_logits(n, step + 100 * i as u64);
            let enc_logits = perm.scatter(&logits).unwrap();
            let a = plain.sample(&logits, &plain_keys, Some(3)).unwrap();
            let b = enc.sample(&enc_logits, &enc_keys, Some(3)).unwrap();
            assert_eq!(
                perm.decrypt(b.token).unwrap(),
                a.token,
                "params {i} step {step}"
            );
            let (a, b) = (a.logprobs.unwrap(), b.logprobs.unwrap());
            assert_eq!(a.logprob, b.logprob);
            let dec: Vec<_> = b
                .top
                .iter()
                .map(|&(t, p)| (perm.decrypt(t).unwrap(), p))
                .collect();
            assert_eq!(dec, a.top);
        }
    }
}

#[test]
fn same_seed_same_draws_different_seed_differs() {
    let logits = vec![1.0f32; 1000];
    let draw = |seed| {
        let mut s = Sampler::new(
            SamplingParams {
                seed: Some(seed),
                ..Default::default()
            },
            &[],
        )
        .unwrap();
        (0..20)
            .map(|_| s.sample(&logits, &keys(1000), None).unwrap().token)
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
}

#[test]
fn top_k_and_top_p_restrict_the_support() {
    let logits: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
    let mut s = Sampler::new(
        SamplingParams {
            top_k: 3,
            seed: Some(9),
            ..Default::default()
        },
        &[],
    )
    .unwrap();
    for _ in 0..100 {
        assert!(s.sample(&logits, &keys(100), None).unwrap().token >= 97);
    }
    let mut peaked = vec![0.0f32; 100];
    peaked[42] = 20.0;
    let mut s = Sampler::new(
        SamplingParams {
            top_p: 0.5,
            seed: Some(9),
            ..Default::default()
        },
        &[],
    )
    .unwrap();
    for _ in 0..50 {
        assert_eq!(s.sample(&peaked, &keys(100), None).unwrap().token, 42);
    }
}

#[test]
fn logprobs_are_normalised() {
    let mut s = Sampler::new(SamplingParams::greedy(), &[]).unwrap();
    let out = s
        .sample(&[0.0, 0.0f32.ln_1p(), 1.0, 2.0], &keys(4), Some(4))
        .unwrap();
    let lp = out.logprobs.unwrap();
    let total: f32 = lp.top.iter().map(|(_, lp)| lp.exp()).sum();
    assert!((total - 1.0).abs() < 1e-5, "{total}");
    assert_eq!(lp.top[0].0, 3);
    assert_eq!(lp.logprob, lp.top[0].1);
    let quiet = s.sample(&[0.0, 1.0], &keys(2), None).unwrap();
    assert_eq!((quiet.token, quiet.logprobs), (1, None));
}

#[test]
fn validation_rejects_out_of_range_settings() {
    let ok = SamplingParams::default();
    assert!(ok.validate(10).is_ok());
    for bad in [
        SamplingParams {
            temperature: -1.0,
            ..ok.clone()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..ok.clone()
        },
        SamplingParams {
            top_p: 0.0,
            ..ok.clone()
        },
        SamplingParams {
            min_p: 1.5,
            ..ok.clone()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..ok.clone()
        },
        SamplingParams {
            presence_penalty: 3.0,
            ..ok.clone()
        },
        SamplingParams {
            logit_bias: vec![(10, 1.0)],
            ..ok.clone()
        },
        SamplingParams {
            logit_bias: vec![(1, 1000.0)],
            ..ok.clone()
        },
    ] {
        assert!(bad.validate(10).is_err(), "{bad:?}");
    }
}

#[test]
fn repetition_penalty_discourages_seen_tokens() {
    let mut s = Sampler::new(
        SamplingParams {
            repetition_penalty: 10.0,
            ..SamplingParams::greedy()
        },
        &[1],
    )
    .unwrap();
    assert_eq!(s.sample(&[1.0, 2.0, 1.5], &keys(3), None).unwrap().token, 2);
}
