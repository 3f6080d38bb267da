//! The real model as a Hugging Face checkpoint, made from the default GGUF
//! (see `ee_e2e::hf_fixture`): against candle-transformers' independent
//! `llama.rs`, against the GGUF it came from, and encrypted, in the engine
//! and through the whole stack.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use ee_client::model_tool::KeySource;
use ee_e2e::hf_fixture::real_hf_checkpoint;
use ee_e2e::{chat_ids, client, encrypt, encrypt_real_model, model_path, PROMPTS};
use ee_engine::{generate, GenerateOptions};
use safetensors::tensor::Dtype;

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

#[test]
fn the_real_checkpoint_agrees_with_candle_transformers_llama() {
    let dir = real_hf_checkpoint(Dtype::F32);
    // An f32 KV cache, as candle's: this compares the forward passes, to
    // rounding (`reference_model.rs` bounds what an f16 cache changes).
    let opts = ee_engine::LoadOptions {
        kv_cache_dtype: ee_engine::KvCacheDtype::F32,
        ..Default::default()
    };
    let ours = ee_engine::load_with(&dir, &opts).unwrap();
    let config: llama::LlamaConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let config = config.into_config(false);
    // SAFETY: the checkpoint is not changed while the test runs.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let theirs = llama::Llama::load(vb, &config).unwrap();
    let mut their_cache = llama::Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
    let run = |t: &[u32], pos: usize, cache: &mut llama::Cache| -> Vec<f32> {
        let input = Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        theirs
            .forward(&input, pos, cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let pair = encrypt_real_model(&KeySource::Identity);
    let (codec, template) = client(&pair.bundle);
    let prompt = chat_ids(&codec, &template, PROMPTS[0]);
    let mut our_cache = ours.new_cache();
    let mut mine = ours.forward_one(&prompt, &mut our_cache).unwrap();
    let mut other = run(&prompt, 0, &mut their_cache);
    for (step, pos) in (0..32).zip(prompt.len()..) {
        // Both compute in f32 from the same weights; only summation order
        // differs.
        let diff = mine
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 5e-3, "step {step}: logits differ by {diff}");
        let next = argmax(&mine);
        assert_eq!(next, argmax(&other), "greedy token {step} differs");
        mine = ours.forward_one(&[next], &mut our_cache).unwrap();
        other = run(&[next], pos, &mut their_cache);
    }
}

/// The checkpoint holds the GGUF's exact weight values, but the GGUF path
/// rounds activations to 8 bits before each quantized matmul (as llama.cpp
/// and candle's `quantized_llama` do) where the float path keeps f32, so
/// logits differ by up to about one unit in 25, and greedy text parts where
/// the two best tokens are that close. Which prompts part, and where, moves
/// with any change of rounding (measured: with one attention kernel one of
/// the five answers was identical, with the next none; they part at tokens
/// 0, 1, 10, 15 and 17, each at a near-tie, margins 0.02-0.23). So the test
/// holds every parting to a near-tie in both models, and the logits to that
/// bound, and counts identical answers only to report them.
#[test]
fn the_checkpoint_answers_the_exactness_prompts_like_its_gguf() {
    let gguf = ee_engine::load(&model_path()).unwrap();
    let hf = ee_engine::load(&real_hf_checkpoint(Dtype::F32)).unwrap();
    let pair = encrypt_real_model(&KeySource::Identity);
    let (codec, template) = client(&pair.bundle);
    let opts = GenerateOptions {
        max_tokens: 48,
        stop_token_ids: pair.bundle.manifest.special_tokens.stop_ids.clone(),
        ..Default::default()
    };
    let mut identical = 0;
    for prompt in PROMPTS {
        let ids = chat_ids(&codec, &template, prompt);
        let a = generate(gguf.as_ref(), &ids, &opts, |_| {})
            .unwrap()
            .token_ids();
        let b = generate(hf.as_ref(), &ids, &opts, |_| {})
            .unwrap()
            .token_ids();
        let Some(at) = (0..a.len().min(b.len())).find(|&i| a[i] != b[i]) else {
            assert_eq!(a, b, "{prompt:?}: one answer is a prefix of the other");
            identical += 1;
            continue;
        };
        let prefix = [&ids[..], &a[..at]].concat();
        let lg = gguf.forward_one(&prefix, &mut gguf.new_cache()).unwrap();
        let lh = hf.forward_one(&prefix, &mut hf.new_cache()).unwrap();
        let diff = lg
            .iter()
            .zip(&lh)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let (ta, tb) = (a[at] as usize, b[at] as usize);
        let margins = (lg[ta] - lg[tb], lh[tb] - lh[ta]);
        eprintln!(
            "{prompt:?}: parts at token {at} (logits differ by up to {diff:.3}; margins {margins:?})\n  GGUF: {:?}\n  HF:   {:?}",
            codec.decode(&a).unwrap(),
            codec.decode(&b).unwrap()
        );
        assert!(diff < LOGIT_BOUND, "{prompt:?}: logits differ by {diff}");
        assert!(
            margins.0 < NEAR_TIE && margins.1 < NEAR_TIE,
            "{prompt:?}: parts at token {at} where one model is sure: {margins:?}"
        );
    }
    eprintln!("{identical} of {} answers identical", PROMPTS.len());
}

/// The most any logit of the GGUF and the checkpoint may differ by.
const LOGIT_BOUND: f32 = 1.5;
/// How close the two best tokens must be where the texts part.
const NEAR_TIE: f32 = 0.5;

#[test]
fn an_encrypted_real_checkpoint_gives_bit_identical_logits_and_text() {
    let dir = real_hf_checkpoint(Dtype::BF16);
    let pair = encrypt(&dir, &KeySource::Generate);
    let perm = pair
        .bundle
        .key
        .vocab_permutation(pair.bundle.manifest.vocab_size);
    assert!(!perm.is_identity());
    let plain = ee_engine::load(&dir).unwrap();
    let enc = ee_engine::load(&pair.server_artifact).unwrap();
    let (codec, template) = client(&pair.bundle);
    let opts = GenerateOptions {
        max_tokens: 24,
        ..Default::default()
    };
    for prompt in PROMPTS {
        let ids = chat_ids(&codec, &template, prompt);
        let enc_ids = perm.encrypt_all(&ids).unwrap();
        let p = plain.forward_one(&ids, &mut plain.new_cache()).unwrap();
        let e = enc.forward_one(&enc_ids, &mut enc.new_cache()).unwrap();
        let e = perm.gather(&e).unwrap();
        let first_diff = (0..p.len()).find(|&i| p[i].to_bits() != e[i].to_bits());
        assert_eq!(first_diff, None, "{prompt:?}");
        let pt = generate(plain.as_ref(), &ids, &opts, |_| {})
            .unwrap()
            .token_ids();
        let et = generate(enc.as_ref(), &enc_ids, &opts, |_| {})
            .unwrap()
            .token_ids();
        assert_eq!(perm.decrypt_all(&et).unwrap(), pt, "{prompt:?}");
        assert!(!codec.decode(&pt).unwrap().trim().is_empty());
    }
}
