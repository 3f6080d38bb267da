//! Hugging Face checkpoints (config.json + safetensors) through the model
//! seam, against candle-transformers' independent `llama.rs` and
//! `mistral.rs` on tiny random-weight checkpoints; shards; bad inputs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral};
use ee_engine::testing::hf::{write_tiny_hf_model, TinyHfSpec};
use ee_engine::testing::TinySpec;
use ee_engine::CausalLm;
use safetensors::tensor::Dtype;
use serde_json::json;

fn written(spec: &TinyHfSpec) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf_model(dir.path(), spec).unwrap();
    dir
}

fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    files
}

fn reference_weights(dir: &Path) -> VarBuilder<'static> {
    // SAFETY: the files are ours and stay unchanged during the test.
    unsafe {
        VarBuilder::from_mmaped_safetensors(&safetensors_files(dir), DType::F32, &Device::Cpu)
    }
    .unwrap()
}

fn config_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 37 + 5) % vocab) as u32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j])).unwrap() as u32
}

const TOLERANCE: f32 = 2e-3;

/// The checkpoint at `dir` with an f32 KV cache, as candle's models keep:
/// the comparisons below are of the forward pass, to rounding (an f16
/// cache's rounding is bounded in `tests/tests/reference_model.rs`).
fn load_as_candle_caches(dir: &Path) -> Arc<dyn CausalLm> {
    let opts = ee_engine::LoadOptions {
        kv_cache_dtype: ee_engine::KvCacheDtype::F32,
        ..Default::default()
    };
    ee_engine::load_with(dir, &opts).unwrap()
}

/// Our engine and candle's `llama.rs` on the same checkpoint: the logits
/// after a 20-token prompt, then 32 greedy tokens, each step's logits.
fn agrees_with_candle_llama(name: &str, spec: &TinyHfSpec) {
    let dir = written(spec);
    let ours = load_as_candle_caches(dir.path());
    let config: llama::LlamaConfig = serde_json::from_value(config_json(dir.path())).unwrap();
    let config = config.into_config(false);
    let reference = llama::Llama::load(reference_weights(dir.path()), &config).unwrap();
    let mut their_cache = llama::Cache::new(true, DType::F32, &config, &Device::Cpu).unwrap();
    let mut our_cache = ours.new_cache();

    let tokens = prompt(20, ours.vocab_size());
    let run = |t: &[u32], pos: usize, cache: &mut llama::Cache| -> Vec<f32> {
        let input = Tensor::new(t, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        reference
            .forward(&input, pos, cache)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let mut mine = ours.forward_one(&tokens, &mut our_cache).unwrap();
    let mut theirs = run(&tokens, 0, &mut their_cache);
    for (step, pos) in (0..32).zip(tokens.len()..) {
        let diff = max_diff(&mine, &theirs);
        assert!(
            diff < TOLERANCE,
            "{name}: step {step}: logits differ by {diff}"
        );
        let next = argmax(&mine);
        assert_eq!(next, argmax(&theirs), "{name}: greedy token {step} differs");
        mine = ours.forward_one(&[next], &mut our_cache).unwrap();
        theirs = run(&[next], pos, &mut their_cache);
    }
}

#[test]
fn llama_checkpoints_agree_with_candle_transformers_llama() {
    let base = TinyHfSpec::llama(Dtype::F32);
    agrees_with_candle_llama("f32, tied", &base);
    agrees_with_candle_llama(
        "bf16, untied",
        &TinyHfSpec {
            dtype: Dtype::BF16,
            shape: TinySpec {
                untied_output: true,
                seed: 11,
                ..base.shape.clone()
            },
            ..base.clone()
        },
    );
    // Three q-heads per kv-head, and Llama 3's RoPE scaling with an original
    // context short enough that every regime of it is used.
    agrees_with_candle_llama(
        "f16, gqa 3, llama3 rope",
        &TinyHfSpec {
            dtype: Dtype::F16,
            shape: TinySpec {
                n_embd: 192,
                n_head: 6,
                n_kv_head: 2,
                seed: 12,
                ..base.shape.clone()
            },
            rope_scaling: Some(
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
            ),
            ..base
        },
    );
}

/// candle's `mistral.rs` masks key `j` for query `i` when `j + w < i`, so it
/// attends to `w + 1` positions, where transformers' `sliding_window_overlay`
/// and llama.cpp's `is_masked_swa` attend to `w` (ours too). It is given
/// `w - 1` to mean the same window. Its decode steps ignore the window, so
/// only the prefill is compared, with the prompt well past the window.
#[test]
fn a_mistral_checkpoint_with_a_short_sliding_window_agrees_with_candle_mistral() {
    let window = 8;
    let spec = TinyHfSpec {
        shape: TinySpec {
            architecture: "mistral",
            sliding_window: Some(window),
            untied_output: true,
            seed: 13,
            ..TinySpec::llama_q4_1()
        },
        // An explicit head_dim wider than hidden_size / heads, as Mistral
        // Nemo's.
        head_dim: Some(32),
        ..TinyHfSpec::llama(Dtype::BF16)
    };
    let dir = written(&spec);
    let ours = load_as_candle_caches(dir.path());
    let mut config = config_json(dir.path());
    config["sliding_window"] = json!(window - 1);
    let config: mistral::Config = serde_json::from_value(config).unwrap();
    let mut reference = mistral::Model::new(&config, reference_weights(dir.path())).unwrap();
    for n in [window / 2, 3 * window] {
        let tokens = prompt(n, ours.vocab_size());
        let mine = ours.forward_one(&tokens, &mut ours.new_cache()).unwrap();
        reference.clear_kv_cache();
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs: Vec<f32> = reference
            .forward(&input, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let diff = max_diff(&mine, &theirs);
        assert!(diff < TOLERANCE, "{n} tokens: logits differ by {diff}");
    }
    // The window matters: without it the same prompt gives other logits.
    let mut wide = config_json(dir.path());
    wide["sliding_window"] = json!(null);
    std::fs::write(dir.path().join("config.json"), wide.to_string()).unwrap();
    let unwindowed = ee_engine::load(dir.path()).unwrap();
    let tokens = prompt(3 * window, ours.vocab_size());
    let a = ours.forward_one(&tokens, &mut ours.new_cache()).unwrap();
    let b = unwindowed
        .forward_one(&tokens, &mut unwindowed.new_cache())
        .unwrap();
    assert!(max_diff(&a, &b) > 1e-3);
}

#[test]
fn a_sharded_checkpoint_loads_the_same_as_a_single_file() {
    let single = TinyHfSpec::llama(Dtype::BF16);
    let sharded = TinyHfSpec {
        shards: 3,
        ..single.clone()
    };
    let (a, b) = (written(&single), written(&sharded));
    assert_eq!(safetensors_files(b.path()).len(), 3);
    assert!(b.path().join("model.safetensors.index.json").exists());
    let (a, b) = (
        ee_engine::load(a.path()).unwrap(),
        ee_engine::load(b.path()).unwrap(),
    );
    let tokens = prompt(12, a.vocab_size());
    let la = a.forward_one(&tokens, &mut a.new_cache()).unwrap();
    let lb = b.forward_one(&tokens, &mut b.new_cache()).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&la), bits(&lb));
    assert_eq!(a.tie_keys(), b.tie_keys());
    assert_eq!(
        (a.architecture(), a.weight_types().as_str()),
        ("llama", "BF16")
    );
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    ee_engine::testing::write_tiny_model(&gguf, &TinySpec::llama_q4_1()).unwrap();
    assert_eq!(ee_engine::load(&gguf).unwrap().weight_types(), "Q4_1, Q8_0");
}

fn load_error(dir: &Path) -> String {
    match ee_engine::load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_checkpoints_are_refused_with_the_file_named() {
    let spec = TinyHfSpec {
        shards: 2,
        ..TinyHfSpec::llama(Dtype::F16)
    };

    let dir = written(&spec);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("config.json"), "{err}");

    let dir = written(&spec);
    let mut config = config_json(dir.path());
    config["architectures"] = json!(["GPT2LMHeadModel"]);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("config.json"),
        "{err}"
    );

    let dir = written(&spec);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("missing"),
        "{err}"
    );

    let dir = written(&spec);
    let shard = dir.path().join("model-00001-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model-00001-of-00002.safetensors"), "{err}");

    // The config promises other shapes than the weights have.
    let dir = written(&spec);
    let mut config = config_json(dir.path());
    config["intermediate_size"] = json!(96);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("mlp.gate_proj") && err.contains("shape"),
        "{err}"
    );

    // An untied config whose checkpoint lacks the head it needs.
    let dir = written(&TinyHfSpec::llama(Dtype::F32));
    let mut config = config_json(dir.path());
    config["tie_word_embeddings"] = json!(false);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("lm_head.weight"), "{err}");

    // A tensor in a dtype the engine does not run.
    let dir = tempfile::tempdir().unwrap();
    let single = TinyHfSpec::llama(Dtype::F32);
    write_tiny_hf_model(dir.path(), &single).unwrap();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ints: Vec<u8> = vec![0; 4 * 64];
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| match name.as_str() {
            "model.norm.weight" => (
                name,
                safetensors::tensor::TensorView::new(Dtype::I32, vec![64], &ints).unwrap(),
            ),
            _ => (name, view),
        })
        .collect();
    let rewritten = safetensors::serialize(views, &None).unwrap();
    std::fs::write(&path, rewritten).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("model.norm.weight")
            && err.contains("I32")
            && err.contains("model.safetensors"),
        "{err}"
    );
}

/// The transform of a checkpoint: encrypted logits are the plaintext ones,
/// permuted, bit for bit; greedy text is the same; the artifact's config
/// keeps no token IDs and its fingerprint is what the server computes.
#[test]
fn an_encrypted_checkpoint_is_exact_and_blind() {
    use ee_core::transform::safetensors::write_hf_server_artifact;
    use ee_engine::{generate, GenerateOptions, ModelFiles};

    for spec in [
        TinyHfSpec {
            shape: TinySpec {
                untied_output: true,
                seed: 21,
                ..TinySpec::llama_q4_1()
            },
            ..TinyHfSpec::llama(Dtype::BF16)
        },
        TinyHfSpec {
            shards: 2,
            ..TinyHfSpec::llama(Dtype::F16)
        },
        // Mistral, with a window shorter than the prompt and the answer.
        TinyHfSpec {
            shape: TinySpec {
                architecture: "mistral",
                sliding_window: Some(8),
                seed: 22,
                ..TinySpec::llama_q4_1()
            },
            ..TinyHfSpec::llama(Dtype::BF16)
        },
    ] {
        let plain_dir = written(&spec);
        // A converter's free-form header metadata must not reach the server.
        let first = safetensors_files(plain_dir.path()).remove(0);
        let bytes = std::fs::read(&first).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let marker = std::collections::HashMap::from([(
            "chat_template".to_owned(),
            "a-plaintext-marker".to_owned(),
        )]);
        let rewritten = safetensors::serialize(st.tensors(), &Some(marker)).unwrap();
        std::fs::write(&first, rewritten).unwrap();

        let out = tempfile::tempdir().unwrap();
        let enc_dir = out.path().join("server");
        let plain = ee_engine::load(plain_dir.path()).unwrap();
        let perm = ee_core::Key::from_bytes([7; 32]).vocab_permutation(plain.vocab_size() as u32);
        let mut calls = 0;
        let report =
            write_hf_server_artifact(plain_dir.path(), &enc_dir, &perm, &mut |_, _| calls += 1)
                .unwrap();
        assert!(calls > 0);
        let expected: Vec<&str> = match spec.shape.untied_output {
            true => vec!["lm_head.weight", "model.embed_tokens.weight"],
            false => vec!["model.embed_tokens.weight"],
        };
        assert_eq!(report.permuted_tensors, expected);
        assert_eq!(ModelFiles::open(&enc_dir).unwrap().sha256(), report.sha256);
        let plain_data = ModelFiles::open(plain_dir.path())
            .unwrap()
            .client_side_data();
        for expected in ["tokenizer.json", "config.json: bos_token_id"] {
            assert!(plain_data.iter().any(|d| d == expected), "{plain_data:?}");
        }
        assert_eq!(
            ModelFiles::open(&enc_dir).unwrap().client_side_data(),
            Vec::<String>::new()
        );
        let mut keys: Vec<String> = config_json(&enc_dir)
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        keys.sort();
        let mut kept = vec![
            "architectures",
            "hidden_act",
            "hidden_size",
            "intermediate_size",
            "max_position_embeddings",
            "model_type",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_scaling",
            "rope_theta",
            "sliding_window",
            "tie_word_embeddings",
            "torch_dtype",
            "vocab_size",
        ];
        kept.sort();
        assert_eq!(
            keys, kept,
            "the server config keeps the architecture's keys only"
        );
        let mut files: Vec<String> = std::fs::read_dir(&enc_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut expected_files: Vec<String> = std::fs::read_dir(plain_dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n == "config.json" || n.starts_with("model"))
            .collect();
        expected_files.sort();
        assert_eq!(files, expected_files, "no tokenizer files, nothing else");
        for file in safetensors_files(&enc_dir) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(!bytes.windows(18).any(|w| w == b"a-plaintext-marker"));
        }
        let entries: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temporary directory is left");
        // The fingerprint covers every file the server reads.
        let index = enc_dir.join("model.safetensors.index.json");
        if index.exists() {
            let mut v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
            v["metadata"] = json!({"total_size": 1});
            std::fs::write(&index, v.to_string()).unwrap();
            assert_ne!(ModelFiles::open(&enc_dir).unwrap().sha256(), report.sha256);
        }

        let enc = ee_engine::load(&enc_dir).unwrap();
        let tokens = prompt(17, plain.vocab_size());
        let enc_tokens = perm.encrypt_all(&tokens).unwrap();
        let p = plain
            .forward_all_positions(&tokens, &mut plain.new_cache())
            .unwrap();
        let e = enc
            .forward_all_positions(&enc_tokens, &mut enc.new_cache())
            .unwrap();
        let (p, e): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (p.to_vec2().unwrap(), e.to_vec2().unwrap());
        for (pos, (pr, er)) in p.iter().zip(&e).enumerate() {
            for (t, &v) in pr.iter().enumerate() {
                let c = perm.encrypt(t as u32).unwrap() as usize;
                assert_eq!(v.to_bits(), er[c].to_bits(), "position {pos}, token {t}");
            }
        }
        let opts = GenerateOptions {
            max_tokens: 24,
            ..Default::default()
        };
        let gp = generate(plain.as_ref(), &tokens, &opts, |_| {})
            .unwrap()
            .token_ids();
        let ge = generate(enc.as_ref(), &enc_tokens, &opts, |_| {})
            .unwrap()
            .token_ids();
        assert_eq!(perm.decrypt_all(&ge).unwrap(), gp);

        // A second transform into the same, now full, directory is refused.
        let err = write_hf_server_artifact(plain_dir.path(), &enc_dir, &perm, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an empty directory"), "{err}");
    }
}
