//! Exactness of the engine on tiny generated models of every supported
//! architecture and weight format: encrypted vs plaintext, batched vs alone,
//! and our forward pass vs candle-transformers' independent `quantized_llama`.

use std::path::PathBuf;
use std::sync::Arc;

use ee_core::transform::write_server_artifact;
use ee_core::{Key, Permutation};
use ee_engine::testing::{write_tiny_model, TinySpec};
use ee_engine::{generate, CausalLm, GenerateOptions, LoadOptions, SamplingParams, SeqStep};

mod common;
use common::reference_logits;

struct Pair {
    _dir: tempfile::TempDir,
    plain_path: PathBuf,
    plain: Arc<dyn CausalLm>,
    enc: Arc<dyn CausalLm>,
    perm: Permutation,
}

fn pair(spec: &TinySpec) -> Pair {
    pair_of(spec, |path| write_tiny_model(path, spec).unwrap())
}

/// A plaintext model, written by `write` at `plain.gguf`, and its
/// encryption under a key from `spec`'s seed.
fn pair_of(spec: &TinySpec, write: impl FnOnce(&std::path::Path)) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let plain_path = dir.path().join("plain.gguf");
    let enc_path = dir.path().join("enc.gguf");
    write(&plain_path);
    let plain = ee_engine::load(&plain_path).unwrap();
    let perm = Key::from_bytes([spec.seed as u8; 32]).vocab_permutation(plain.vocab_size() as u32);
    write_server_artifact(&plain_path, &enc_path, &perm, &mut |_, _| {}).unwrap();
    let enc = ee_engine::load(&enc_path).unwrap();
    Pair {
        _dir: dir,
        plain_path,
        plain,
        enc,
        perm,
    }
}

fn prompt(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + salt * 11 + 5) % vocab) as u32)
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Our kernels (quantized and float weights, attention) compute each
/// activation row on its own, so batching is bit-exact.
fn assert_batch_invariant(name: &str, alone: &[f32], batched: &[f32]) {
    if let Some(i) = (0..alone.len()).find(|&i| alone[i].to_bits() != batched[i].to_bits()) {
        panic!(
            "{name}: batching changed logit {i}: {} vs {}",
            alone[i], batched[i]
        );
    }
}

#[test]
fn encrypted_logits_are_bit_identical_for_every_variant() {
    for (name, spec) in TinySpec::all_variants() {
        let p = pair(&spec);
        let tokens = prompt(20, p.plain.vocab_size(), 1);
        let enc_tokens = p.perm.encrypt_all(&tokens).unwrap();
        let plain = p
            .plain
            .forward_all_positions(&tokens, &mut p.plain.new_cache())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let enc = p
            .enc
            .forward_all_positions(&enc_tokens, &mut p.enc.new_cache())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_ne!(
            bits(&plain[19]),
            bits(&enc[19]),
            "{name}: the encrypted model must permute its logits"
        );
        for (pos, (a, b)) in plain.iter().zip(&enc).enumerate() {
            assert_eq!(
                bits(a),
                bits(&p.perm.gather(b).unwrap()),
                "{name}: logits differ at position {pos}"
            );
        }
    }
}

/// llama.cpp's BF16 GGUFs (a type candle lacks, so not among the variants
/// compared with candle) encrypt bit for bit too.
#[test]
fn bf16_gguf_logits_are_bit_identical_through_encryption() {
    let spec = TinySpec {
        weights: candle_core::quantized::GgmlDType::F32,
        embedding: candle_core::quantized::GgmlDType::F32,
        seed: 8,
        ..TinySpec::llama_q4_1()
    };
    let p = pair_of(&spec, |path| {
        let dir = path.parent().unwrap();
        let (f32_path, rounded) = (dir.join("f32.gguf"), dir.join("rounded.gguf"));
        write_tiny_model(&f32_path, &spec).unwrap();
        ee_engine::testing::write_bf16_twins(&f32_path, path, &rounded).unwrap();
    });
    assert_eq!(p.plain.weight_types(), "BF16");
    let tokens = prompt(20, p.plain.vocab_size(), 9);
    let enc_tokens = p.perm.encrypt_all(&tokens).unwrap();
    let plain = p
        .plain
        .forward_one(&tokens, &mut p.plain.new_cache())
        .unwrap();
    let enc = p
        .enc
        .forward_one(&enc_tokens, &mut p.enc.new_cache())
        .unwrap();
    assert_ne!(bits(&plain), bits(&enc));
    assert_eq!(bits(&plain), bits(&p.perm.gather(&enc).unwrap()));
}

#[test]
fn greedy_and_seeded_generation_match_through_encryption() {
    for (name, spec) in TinySpec::all_variants() {
        let p = pair(&spec);
        let tokens = prompt(12, p.plain.vocab_size(), 2);
        let enc_tokens = p.perm.encrypt_all(&tokens).unwrap();
        for sampling in [
            SamplingParams::greedy(),
            SamplingParams {
                temperature: 0.8,
                seed: Some(42),
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.2,
                top_p: 0.9,
                top_k: 40,
                repetition_penalty: 1.1,
                seed: Some(7),
                ..Default::default()
            },
        ] {
            let opts = GenerateOptions {
                max_tokens: 24,
                sampling: sampling.clone(),
                ..Default::default()
            };
            let plain = generate(p.plain.as_ref(), &tokens, &opts, |_| {})
                .unwrap()
                .token_ids();
            let enc = generate(p.enc.as_ref(), &enc_tokens, &opts, |_| {})
                .unwrap()
                .token_ids();
            assert_eq!(plain.len(), 24);
            assert_eq!(
                p.perm.decrypt_all(&enc).unwrap(),
                plain,
                "{name} {sampling:?}"
            );
        }
    }
}

#[test]
fn batching_does_not_change_any_sequence() {
    for (name, spec) in TinySpec::all_variants() {
        let p = pair(&spec);
        let m = p.plain.as_ref();
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|i| prompt(5 + 7 * i, m.vocab_size(), i))
            .collect();
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|t| m.forward_one(t, &mut m.new_cache()).unwrap())
            .collect();
        let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache()).collect();
        let mut steps: Vec<SeqStep> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| SeqStep {
                tokens: t,
                cache: c,
            })
            .collect();
        let together = m.forward(&mut steps).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..3 {
            assert_batch_invariant(name, &alone[i], &together[i]);
        }
        // A decode step batched with a prefill chunk of another sequence.
        let mut solo_cache = m.new_cache();
        m.forward_one(&prompts[0], &mut solo_cache).unwrap();
        let solo = m.forward_one(&[9], &mut solo_cache).unwrap();
        let newcomer = prompt(9, m.vocab_size(), 7);
        let mut fresh = m.new_cache();
        let (c0, _) = caches.split_at_mut(1);
        let mixed = m
            .forward(&mut [
                SeqStep {
                    tokens: &newcomer,
                    cache: &mut fresh,
                },
                SeqStep {
                    tokens: &[9],
                    cache: &mut c0[0],
                },
            ])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_batch_invariant(name, &solo, &mixed[1]);
    }
}

/// A token's logits do not depend on how its prompt was chunked: one
/// prefill, chunks or a token at a time (decode steps) give the same bits,
/// on every variant (which a preempted sequence's recompute relies on).
#[test]
fn chunked_prefill_and_decode_steps_match_whole_prefill_bit_for_bit() {
    for (name, spec) in TinySpec::all_variants() {
        let p = pair(&spec);
        let m = p.plain.as_ref();
        let tokens = prompt(40, m.vocab_size(), 3);
        let whole = m.forward_one(&tokens, &mut m.new_cache()).unwrap();
        for size in [16, 1] {
            let mut cache = m.new_cache();
            let mut chunked = Vec::new();
            for chunk in tokens.chunks(size) {
                chunked = m.forward_one(chunk, &mut cache).unwrap();
            }
            assert_eq!(bits(&whole), bits(&chunked), "{name}, chunks of {size}");
        }
    }
}

#[test]
fn forward_pass_agrees_with_candle_quantized_llama() {
    // On candle's own kernels, so this checks the forward pass itself; the
    // real-model test in tests/ checks our kernels end to end.
    let opts = ee_engine::LoadOptions {
        candle_kernels: true,
        candle_elementwise: true,
        kv_cache_dtype: ee_engine::KvCacheDtype::F32,
    };
    for (name, spec) in TinySpec::all_variants()
        .into_iter()
        .filter(|(_, s)| s.sliding_window.is_none())
    {
        let p = pair(&spec);
        let model = ee_engine::load_with(&p.plain_path, &opts).unwrap();
        let tokens = prompt(24, model.vocab_size(), 4);
        let ours = model.forward_one(&tokens, &mut model.new_cache()).unwrap();
        let theirs = reference_logits(&p.plain_path, &tokens);
        let scale = theirs.iter().map(|x| x.abs()).fold(0f32, f32::max);
        let max_diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Same kernels, same order of operations: agreement to float rounding.
        assert!(
            max_diff <= 1e-5 * scale.max(1.0),
            "{name}: max |diff| {max_diff} (logit scale {scale})"
        );
    }
}

#[test]
fn sliding_window_limits_attention() {
    let spec = TinySpec::all_variants()
        .into_iter()
        .find(|(n, _)| n.starts_with("mistral"))
        .unwrap()
        .1;
    let p = pair(&spec);
    let m = p.plain.as_ref();
    // Information flows back at most n_layers x window positions (2 x 8 here):
    // two prompts that differ only before that reach give identical logits,
    // though a full-attention model would tell them apart.
    let mut c = prompt(40, m.vocab_size(), 5);
    let mut d = c.clone();
    c[0] = 10;
    d[0] = 11;
    let lc = m.forward_one(&c, &mut m.new_cache()).unwrap();
    let ld = m.forward_one(&d, &mut m.new_cache()).unwrap();
    assert_eq!(
        bits(&lc),
        bits(&ld),
        "tokens beyond the window's reach must not matter"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let p = pair(&TinySpec::llama_q4_1());
    let m = p.plain.as_ref();
    let too_big = m.vocab_size() as u32;
    assert!(m
        .forward(&mut [SeqStep {
            tokens: &[too_big],
            cache: &mut m.new_cache()
        }])
        .is_err());
    assert!(m
        .forward(&mut [SeqStep {
            tokens: &[],
            cache: &mut m.new_cache()
        }])
        .is_err());
    let long = vec![3u32; m.context_length() + 1];
    let err = m
        .forward(&mut [SeqStep {
            tokens: &long,
            cache: &mut m.new_cache(),
        }])
        .unwrap_err();
    assert!(err.to_string().contains("context length"), "{err}");
    assert!(generate(m, &[], &GenerateOptions::default(), |_| {}).is_err());
}

#[test]
fn generation_stops_on_stop_token_and_respects_length() {
    let p = pair(&TinySpec::llama_q4_1());
    let m = p.plain.as_ref();
    let tokens = prompt(8, m.vocab_size(), 6);
    let free = generate(
        m,
        &tokens,
        &GenerateOptions {
            max_tokens: 10,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    assert_eq!(free.finish_reason, ee_engine::FinishReason::Length);
    let stop_at = free.token_ids()[3];
    let first = free.token_ids().iter().position(|&t| t == stop_at).unwrap();
    let opts = GenerateOptions {
        max_tokens: 10,
        stop_token_ids: vec![stop_at],
        ..Default::default()
    };
    let stopped = generate(m, &tokens, &opts, |_| {}).unwrap();
    assert_eq!(stopped.finish_reason, ee_engine::FinishReason::Stop);
    assert_eq!(stopped.token_ids(), free.token_ids()[..=first]);
}

#[test]
fn odd_block_counts_run_on_our_kernels_and_are_refused_on_candles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.gguf");
    // 96 values = 3 Q4_1 blocks per row: candle's kernel would panic on it.
    let spec = TinySpec {
        n_embd: 96,
        n_head: 6,
        n_kv_head: 2,
        ..TinySpec::llama_q4_1()
    };
    write_tiny_model(&path, &spec).unwrap();
    let ours = ee_engine::load(&path).unwrap();
    let opts = GenerateOptions {
        max_tokens: 4,
        ..Default::default()
    };
    let out = generate(ours.as_ref(), &[1, 2, 3], &opts, |_| {}).unwrap();
    assert_eq!(out.token_ids().len(), 4);
    let candle = LoadOptions {
        candle_kernels: true,
        ..Default::default()
    };
    let err = ee_engine::load_with(&path, &candle)
        .err()
        .expect("load on candle's kernels must fail");
    assert!(err.to_string().contains("odd number of blocks"), "{err}");
}

#[test]
fn decoding_token_by_token_reproduces_prefill_logits() {
    use candle_core::quantized::GgmlDType;
    // F32 weights: no 8-bit activation rounding, so the two attention paths
    // (batched prefill, in-place decode) must agree to float rounding.
    let f32_spec = TinySpec {
        weights: GgmlDType::F32,
        embedding: GgmlDType::F32,
        ..TinySpec::llama_q4_1()
    };
    for (name, spec) in [
        ("gqa", f32_spec.clone()),
        (
            "gqa3",
            TinySpec {
                n_embd: 192,
                n_head: 6,
                n_kv_head: 2,
                ..f32_spec.clone()
            },
        ),
        (
            "sliding-window",
            TinySpec {
                architecture: "mistral",
                sliding_window: Some(8),
                ..f32_spec
            },
        ),
    ] {
        let p = pair(&spec);
        let m = p.plain.as_ref();
        let tokens = prompt(30, m.vocab_size(), 8);
        let all = m
            .forward_all_positions(&tokens, &mut m.new_cache())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut cache = m.new_cache();
        for (i, t) in tokens.iter().enumerate() {
            let row: Vec<f32> = m.forward_one(&[*t], &mut cache).unwrap();
            let scale = all[i].iter().fold(0f32, |a, x| a.max(x.abs()));
            let diff = row
                .iter()
                .zip(&all[i])
                .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{name}: position {i} differs by {diff}"
            );
        }
    }
}
