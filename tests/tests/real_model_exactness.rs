//! The non-negotiable on the real model: the encrypted model on encrypted IDs
//! computes exactly what the plaintext model computes.

use ee_client::model_tool::KeySource;
use ee_e2e::{chat_ids, client, encrypt_real_model, model_path, PROMPTS};
use ee_engine::{generate, GenerateOptions, Sampler, SamplingParams};

#[test]
fn logits_are_bit_identical_and_64_greedy_tokens_match_for_five_prompts() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let perm = pair
        .bundle
        .key
        .vocab_permutation(pair.bundle.manifest.vocab_size);
    assert!(!perm.is_identity());
    let plain = ee_engine::load(&model_path()).unwrap();
    let enc = ee_engine::load(&pair.server_artifact).unwrap();
    let (codec, template) = client(&pair.bundle);
    for prompt in PROMPTS {
        let ids = chat_ids(&codec, &template, prompt);
        let enc_ids = perm.encrypt_all(&ids).unwrap();
        assert_ne!(ids, enc_ids);
        let (mut pc, mut ec) = (plain.new_cache(), enc.new_cache());
        let mut p_logits = plain.forward_one(&ids, &mut pc).unwrap();
        let mut e_logits = enc.forward_one(&enc_ids, &mut ec).unwrap();
        let mut p_sampler = Sampler::new(SamplingParams::greedy(), &ids).unwrap();
        let mut e_sampler = Sampler::new(SamplingParams::greedy(), &enc_ids).unwrap();
        let mut generated = Vec::new();
        for step in 0..64 {
            let unpermuted = perm.gather(&e_logits).unwrap();
            let first_diff =
                (0..p_logits.len()).find(|&i| p_logits[i].to_bits() != unpermuted[i].to_bits());
            assert_eq!(first_diff, None, "{prompt:?}: logits differ at step {step}");
            let p_tok = p_sampler
                .sample(&p_logits, plain.tie_keys(), None)
                .unwrap()
                .token;
            let e_tok = e_sampler
                .sample(&e_logits, enc.tie_keys(), None)
                .unwrap()
                .token;
            assert_eq!(
                perm.decrypt(e_tok),
                Some(p_tok),
                "{prompt:?}: greedy token differs at step {step}"
            );
            generated.push(p_tok);
            p_logits = plain.forward_one(&[p_tok], &mut pc).unwrap();
            e_logits = enc.forward_one(&[e_tok], &mut ec).unwrap();
        }
        assert_eq!(generated.len(), 64);
    }
}

#[test]
fn seeded_sampling_at_temperature_0_8_decrypts_to_the_same_text() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let perm = pair
        .bundle
        .key
        .vocab_permutation(pair.bundle.manifest.vocab_size);
    let plain = ee_engine::load(&model_path()).unwrap();
    let enc = ee_engine::load(&pair.server_artifact).unwrap();
    let (codec, template) = client(&pair.bundle);
    let stops = pair.bundle.manifest.special_tokens.stop_ids.clone();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let ids = chat_ids(&codec, &template, prompt);
        let sampling = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            seed: Some(1000 + i as u64),
            ..Default::default()
        };
        let opts = GenerateOptions {
            max_tokens: 48,
            stop_token_ids: stops.clone(),
            sampling: sampling.clone(),
            ..Default::default()
        };
        let enc_opts = GenerateOptions {
            stop_token_ids: perm.encrypt_all(&stops).unwrap(),
            ..opts.clone()
        };
        let p = generate(plain.as_ref(), &ids, &opts, |_| {}).unwrap();
        let e = generate(
            enc.as_ref(),
            &perm.encrypt_all(&ids).unwrap(),
            &enc_opts,
            |_| {},
        )
        .unwrap();
        let p_text = codec.decode(&p.token_ids()).unwrap();
        let e_text = codec
            .decode(&perm.decrypt_all(&e.token_ids()).unwrap())
            .unwrap();
        assert!(!p_text.trim().is_empty(), "{prompt:?}: empty answer");
        assert_eq!(e_text, p_text, "{prompt:?}");
        assert_eq!(e.finish_reason, p.finish_reason);
        // Encrypted IDs on the wire are not the plaintext IDs.
        assert_ne!(e.token_ids(), p.token_ids());
    }
}

#[test]
fn different_seeds_give_different_samples() {
    let plain = ee_engine::load(&model_path()).unwrap();
    let pair = encrypt_real_model(&KeySource::Identity);
    let (codec, template) = client(&pair.bundle);
    let ids = chat_ids(&codec, &template, "Tell me a short story about a dragon.");
    let run = |seed| {
        let sampling = SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..Default::default()
        };
        generate(
            plain.as_ref(),
            &ids,
            &GenerateOptions {
                max_tokens: 24,
                sampling,
                ..Default::default()
            },
            |_| {},
        )
        .unwrap()
        .token_ids()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}
