//! The hidden tier (`ee encrypt-model --tier hidden`) of Llama/Mistral
//! checkpoints: residual, FFN and head channels permuted on top of the
//! vocabulary. The encrypted model computes the plaintext one's function
//! with its float sums in another order, so logits agree to rounding (the
//! stated tolerance: within 1e-5 of the logit scale with an f32 KV cache,
//! measured under 3e-6 on the real model; 1e-3 with the default f16 cache,
//! whose rounding a reordered sum may tip, measured 1.8e-4 to 2.9e-4) and greedy and
//! seeded answers are the same, on tiny
//! models of each kind and format, on the real model converted to a
//! checkpoint, and on the real GGUF.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use ee_client::model_tool::{encrypt_model_at, KeySource};
use ee_core::bundle::Tier;
use ee_core::{ClientBundle, Key, Permutation};
use ee_e2e::hf_fixture::real_hf_checkpoint;
use ee_engine::testing::hf::{write_tiny_hf_model, TinyHfSpec};
use ee_engine::testing::{write_tiny_model, TinySpec};
use ee_engine::KvCacheDtype::{self, F16, F32};
use ee_engine::{generate, GenerateOptions, LoadOptions, ModelFiles, SamplingParams};
use safetensors::tensor::Dtype;

/// A key whose head permutation moves something in each of `layers`
/// layers of `kv_heads` key/value heads, saved in `dir`: with a random key,
/// a tiny model's 2 heads stay in place half the time, and a wrong head
/// mapping could go unseen.
fn moving_key(dir: &Path, layers: usize, kv_heads: u32) -> PathBuf {
    let key = (0u8..)
        .map(|b| Key::from_bytes([b; 32]))
        .find(|k| {
            (0..layers).all(|l| {
                !k.permutation_for(&format!("ee/v1/hidden/heads/{l}"), kv_heads)
                    .is_identity()
            })
        })
        .unwrap();
    let path = dir.join("key.json");
    key.save(&path).unwrap();
    path
}

/// Every layer's projections.
const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Each layer's projections in `moved` must differ from the plaintext
/// model's once its channels have moved; the others must not.
fn assert_projections_moved(plain: &Path, server: &Path, moved: &[&str]) {
    let (p, e) = (
        ModelFiles::open(plain).unwrap(),
        ModelFiles::open(server).unwrap(),
    );
    let mut layers = 0;
    while p
        .weights()
        .contains(&format!("model.layers.{layers}.self_attn.q_proj.weight"))
    {
        for proj in PROJECTIONS {
            let name = format!("model.layers.{layers}.{proj}.weight");
            let bytes = |f: &ModelFiles| f.weights().tensor(&name).unwrap().bytes.to_vec();
            assert_eq!(bytes(&p) != bytes(&e), moved.contains(&proj), "{name}");
        }
        layers += 1;
    }
    assert!(layers > 0);
}

/// Encrypts `model` at the hidden tier with `key` and runs both models with
/// a KV cache of `kv`; returns the largest logit difference relative to the
/// logit scale, whether 24 greedy tokens and 24 seeded samples decrypt to
/// the plaintext model's, and the transform's notes.
fn compare(
    model: &Path,
    key: &KeySource,
    prompt: &[u32],
    moved: &[&str],
    kv: KvCacheDtype,
) -> (f32, bool, Vec<String>) {
    let out = tempfile::tempdir().unwrap();
    let server = out.path().join(match model.is_dir() {
        true => "server",
        false => "server.gguf",
    });
    let bundle = out.path().join("bundle");
    let summary =
        encrypt_model_at(model, &server, &bundle, key, Tier::Hidden, &mut |_, _| {}).unwrap();
    assert_projections_moved(model, &server, moved);
    let b = ClientBundle::load(&bundle).unwrap();
    assert_eq!(b.manifest.tier, Tier::Hidden);
    let pi: Permutation = b.key.vocab_permutation(b.manifest.vocab_size);
    let opts = LoadOptions {
        kv_cache_dtype: kv,
        ..Default::default()
    };
    let plain = ee_engine::load_with(model, &opts).unwrap();
    let enc = ee_engine::load_with(&server, &opts).unwrap();
    let enc_prompt = pi.encrypt_all(prompt).unwrap();
    let p = plain
        .forward_all_positions(prompt, &mut plain.new_cache())
        .unwrap();
    let e = enc
        .forward_all_positions(&enc_prompt, &mut enc.new_cache())
        .unwrap();
    // Sampling breaks exact ties by each token's key, which must travel
    // with the token.
    for (t, &k) in plain.tie_keys().iter().enumerate() {
        let c = pi.encrypt(t as u32).unwrap() as usize;
        assert_eq!(enc.tie_keys()[c], k, "token {t}'s tie-break key");
    }
    let (p, e): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (p.to_vec2().unwrap(), e.to_vec2().unwrap());
    let (mut worst, mut scale) = (0f32, 0f32);
    for (pr, er) in p.iter().zip(&e) {
        for (t, &v) in pr.iter().enumerate() {
            let c = pi.encrypt(t as u32).unwrap() as usize;
            worst = worst.max((v - er[c]).abs());
            scale = scale.max(v.abs());
        }
    }
    let greedy = GenerateOptions {
        max_tokens: 24,
        ..Default::default()
    };
    let seeded = GenerateOptions {
        max_tokens: 24,
        sampling: SamplingParams {
            temperature: 0.8,
            seed: Some(7),
            ..SamplingParams::greedy()
        },
        ..Default::default()
    };
    let same = [greedy, seeded].iter().all(|o| {
        let gp = generate(plain.as_ref(), prompt, o, |_| {})
            .unwrap()
            .token_ids();
        let ge = generate(enc.as_ref(), &enc_prompt, o, |_| {})
            .unwrap()
            .token_ids();
        pi.decrypt_all(&ge).unwrap() == gp
    });
    (worst / scale, same, summary.report.notes)
}

#[test]
fn tiny_checkpoints_keep_their_function_at_the_hidden_tier() {
    let base = TinyHfSpec::llama(Dtype::F32);
    let specs = [
        ("f32, tied", base.clone()),
        (
            "bf16, untied, gqa 3",
            TinyHfSpec {
                dtype: Dtype::BF16,
                shape: TinySpec {
                    n_embd: 192,
                    n_head: 6,
                    n_kv_head: 2,
                    untied_output: true,
                    seed: 21,
                    ..base.shape.clone()
                },
                ..base.clone()
            },
        ),
        (
            "mistral, sliding window",
            TinyHfSpec {
                shape: TinySpec {
                    architecture: "mistral",
                    sliding_window: Some(8),
                    seed: 22,
                    ..base.shape.clone()
                },
                ..base.clone()
            },
        ),
    ];
    for (what, spec) in specs {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_hf_model(dir.path(), &spec).unwrap();
        let key = moving_key(dir.path(), spec.shape.n_layers, spec.shape.n_kv_head as u32);
        let prompt: Vec<u32> = (0..17).map(|i| 3 + i * 5 % 60).collect();
        let key = KeySource::File(key);
        let (relative, same, _) = compare(dir.path(), &key, &prompt, &PROJECTIONS, F32);
        eprintln!("{what}: largest logit difference {relative:e} of the scale");
        assert!(relative <= 1e-5, "{what}: {relative}");
        assert!(same, "{what}: greedy or seeded answers differ");
    }
}

#[test]
fn the_real_model_keeps_its_function_at_the_hidden_tier() {
    let dir = real_hf_checkpoint(Dtype::F32);
    let prompt = [
        1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ];
    let (relative, same, _) = compare(&dir, &KeySource::Generate, &prompt, &PROJECTIONS, F32);
    eprintln!("SmolLM2 f32 checkpoint: largest logit difference {relative:e} of the scale");
    assert!(relative <= 1e-5, "{relative}");
    assert!(same, "greedy or seeded answers differ");
    // With the default f16 cache, a key or value that the reordered sums
    // move across an f16 rounding boundary moves by up to 2^-10 of itself.
    // Measured: 1.8e-4 to 2.9e-4 of the scale, by key.
    let (relative, same, _) = compare(&dir, &KeySource::Generate, &prompt, &PROJECTIONS, F16);
    eprintln!("with an f16 KV cache: {relative:e} of the scale");
    assert!(relative <= 1e-3, "{relative}");
    assert!(same, "greedy or seeded answers differ with an f16 KV cache");
}

/// GGUF tiny models of every weight format. Channels move only among the
/// values of a quantized block that share a scale (32, or 16 in Q6_K),
/// where the integer dot products do not see the order, and RMSNorm's sum
/// of squares is order-free: the logits are bit-exact. Axes that a float
/// matrix stores along its rows stay, and the notes say so.
#[test]
fn tiny_ggufs_of_every_format_keep_their_logits_bit_for_bit_at_the_hidden_tier() {
    let base = TinySpec::llama_q4_1();
    let all: &[&str] = &PROJECTIONS;
    let mut specs: Vec<(String, TinySpec, &[&str], usize)> = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, weights)| {
        let spec = TinySpec {
            weights,
            seed: 30 + i as u64,
            ..base.clone()
        };
        (format!("{weights:?}"), spec, all, 0)
    })
    .collect();
    let stay = base.n_layers + 1; // the residual, and each layer's FFN
    specs.extend([
        (
            "Q4_1, untied, gqa 3".to_owned(),
            TinySpec {
                n_embd: 192,
                n_head: 6,
                untied_output: true,
                seed: 41,
                ..base.clone()
            },
            all,
            0,
        ),
        (
            "Q8_0 mistral, sliding window".to_owned(),
            TinySpec {
                architecture: "mistral",
                weights: GgmlDType::Q8_0,
                sliding_window: Some(8),
                seed: 42,
                ..base.clone()
            },
            all,
            0,
        ),
        (
            "Q4_0 with an F16 embedding: the residual stays".to_owned(),
            TinySpec {
                weights: GgmlDType::Q4_0,
                embedding: GgmlDType::F16,
                seed: 43,
                ..base.clone()
            },
            &["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
            1,
        ),
        (
            "F32: nothing but the vocabulary moves".to_owned(),
            TinySpec {
                weights: GgmlDType::F32,
                embedding: GgmlDType::F32,
                seed: 44,
                ..base.clone()
            },
            &[],
            stay,
        ),
    ]);
    // K-quants: rows of 512 values are two super-blocks.
    for (i, (weights, embedding)) in [
        (GgmlDType::Q4K, GgmlDType::Q6K),
        (GgmlDType::Q5K, GgmlDType::Q8_0),
        (GgmlDType::Q6K, GgmlDType::Q4K),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = TinySpec {
            weights,
            embedding,
            n_embd: 512,
            n_ff: 512,
            n_head: 8,
            seed: 45 + i as u64,
            ..base.clone()
        };
        specs.push((
            format!("{weights:?}, {embedding:?} embedding"),
            spec,
            all,
            0,
        ));
    }
    for (what, spec, moved, stays) in specs {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("plain.gguf");
        write_tiny_model(&model, &spec).unwrap();
        let prompt: Vec<u32> = (0..17).map(|i| 3 + i * 5 % 60).collect();
        let key = KeySource::File(moving_key(dir.path(), 0, 1));
        let (relative, same, notes) = compare(&model, &key, &prompt, moved, F16);
        eprintln!("{what}: largest logit difference {relative:e} of the scale; {notes:?}");
        assert_eq!(relative, 0.0, "{what}");
        assert!(same, "{what}: greedy or seeded answers differ");
        assert_eq!(notes.len(), stays, "{what}: {notes:?}");
    }
}

/// The real default model, Q4_1 with a Q8_0 embedding: its 576 residual and
/// 1,536 FFN channels move within 32-value blocks, bit-exactly.
#[test]
fn the_real_gguf_keeps_its_logits_bit_for_bit_at_the_hidden_tier() {
    let prompt = [
        1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
    ];
    let model = ee_e2e::model_path();
    let (relative, same, notes) = compare(&model, &KeySource::Generate, &prompt, &PROJECTIONS, F16);
    assert_eq!(relative, 0.0);
    assert!(same, "greedy or seeded answers differ");
    assert!(notes.is_empty(), "{notes:?}");
}
