//! Tiny generated Hugging Face checkpoints: `config.json` and safetensors
//! weights, single-file or sharded, in f32, f16 or bf16, with the tiny
//! byte-level BPE vocabulary as `tokenizer.json`, a ChatML template in
//! `tokenizer_config.json`, and `generation_config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use super::{random_tensor, tiny_vocab, TinySpec, TINY_CHAT_TEMPLATE};
use crate::Error;

/// A tiny HF checkpoint: the shape of a [`TinySpec`] (its `architecture`,
/// sizes, `untied_output`, `sliding_window` and `seed`; its ggml types are
/// unused) in one float dtype.
#[derive(Debug, Clone)]
pub struct TinyHfSpec {
    pub shape: TinySpec,
    pub dtype: Dtype,
    /// An explicit `head_dim` (otherwise `hidden_size / heads`).
    pub head_dim: Option<usize>,
    /// `rope_scaling` as written into `config.json`.
    pub rope_scaling: Option<serde_json::Value>,
    /// Files the weights are split over; 1 writes `model.safetensors`.
    pub shards: usize,
}

impl TinyHfSpec {
    pub fn llama(dtype: Dtype) -> Self {
        Self {
            shape: TinySpec::llama_q4_1(),
            dtype,
            head_dim: None,
            rope_scaling: None,
            shards: 1,
        }
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Model(e.to_string())
}

/// The `config.json` of `spec`.
pub fn tiny_hf_config(spec: &TinyHfSpec) -> serde_json::Value {
    let s = &spec.shape;
    let architecture = match s.architecture {
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let dtype = match spec.dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    };
    let mut config = json!({
        "architectures": [architecture],
        "model_type": s.architecture,
        "hidden_size": s.n_embd,
        "intermediate_size": s.n_ff,
        "num_hidden_layers": s.n_layers,
        "num_attention_heads": s.n_head,
        "num_key_value_heads": s.n_kv_head,
        "vocab_size": tiny_vocab().0.len(),
        "max_position_embeddings": s.context_length,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": !s.untied_output,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "sliding_window": s.sliding_window,
        "rope_scaling": spec.rope_scaling,
    });
    if let Some(d) = spec.head_dim {
        config["head_dim"] = json!(d);
    }
    config
}

/// Writes a tiny random checkpoint into `dir` (which must exist).
pub fn write_tiny_hf_model(dir: &Path, spec: &TinyHfSpec) -> Result<(), Error> {
    let s = &spec.shape;
    let mut rng = ChaCha20Rng::seed_from_u64(s.seed);
    let vocab = tiny_vocab().0.len();
    let head_dim = spec.head_dim.unwrap_or(s.n_embd / s.n_head);
    let (d, f) = (s.n_embd, s.n_ff);
    let (q, kv) = (s.n_head * head_dim, s.n_kv_head * head_dim);
    let w = 1.0 / (d as f32).sqrt() * 1.7;
    let mut shapes: Vec<(String, (usize, usize), f32)> =
        vec![("model.embed_tokens.weight".into(), (vocab, d), 1.0)];
    for l in 0..s.n_layers {
        let n = |t: &str| format!("model.layers.{l}.{t}.weight");
        shapes.extend([
            (n("input_layernorm"), (1, d), 0.0),
            (n("self_attn.q_proj"), (q, d), w),
            (n("self_attn.k_proj"), (kv, d), w),
            (n("self_attn.v_proj"), (kv, d), w),
            (n("self_attn.o_proj"), (d, q), 1.0 / (q as f32).sqrt() * 1.7),
            (n("post_attention_layernorm"), (1, d), 0.0),
            (n("mlp.gate_proj"), (f, d), w),
            (n("mlp.up_proj"), (f, d), w),
            (n("mlp.down_proj"), (d, f), 1.0 / (f as f32).sqrt() * 1.7),
        ]);
    }
    shapes.push(("model.norm.weight".into(), (1, d), 0.0));
    if s.untied_output {
        shapes.push(("lm_head.weight".into(), (vocab, d), 1.0));
    }
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, (rows, cols), scale) in shapes {
        // Norm weights (scale 0 above) are drawn around 1.
        let values: Vec<f32> = if scale == 0.0 {
            random_tensor(&mut rng, (1, cols), 0.2)?
                .affine(1.0, 1.0)?
                .flatten_all()?
                .to_vec1()?
        } else {
            random_tensor(&mut rng, (rows, cols), scale)?
                .flatten_all()?
                .to_vec1()?
        };
        let bytes: Vec<u8> = match spec.dtype {
            Dtype::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let dims = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        tensors.push((name, dims, bytes));
    }
    std::fs::write(dir.join("config.json"), tiny_hf_config(spec).to_string()).map_err(err)?;
    let shards = spec.shards.max(1);
    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = BTreeMap::new();
    for (i, group) in tensors.chunks(per_shard).enumerate() {
        let file = match shards {
            1 => "model.safetensors".to_owned(),
            n => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
        };
        let views = group
            .iter()
            .map(|(name, dims, bytes)| {
                let view = TensorView::new(spec.dtype, dims.clone(), bytes)
                    .map_err(|e| err(format!("{e:?}")))?;
                weight_map.insert(name.clone(), file.clone());
                Ok((name.clone(), view))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        safetensors::serialize_to_file(views, &None, &dir.join(&file))
            .map_err(|e| err(format!("{e:?}")))?;
    }
    if shards > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).map_err(err)?;
    }
    write_tokenizer_files(dir)
}

/// The tiny vocabulary's tokenizer files: BOS `<|im_start|>` (1, not
/// added), EOS `<|im_end|>` (2).
fn write_tokenizer_files(dir: &Path) -> Result<(), Error> {
    let vocab = super::tiny_gguf_vocab();
    let write = |name: &str, v: serde_json::Value| {
        std::fs::write(dir.join(name), v.to_string()).map_err(err)
    };
    write("tokenizer.json", vocab.to_hf_tokenizer_json()?)?;
    write(
        "tokenizer_config.json",
        json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false,
               "chat_template": TINY_CHAT_TEMPLATE}),
    )?;
    write("generation_config.json", json!({"eos_token_id": 2}))
}
