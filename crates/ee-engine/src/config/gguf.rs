//! The config from GGUF metadata.

use ee_core::gguf::Value;

use super::LlamaConfig;
use crate::weights::gguf::GgufWeights;
use crate::Error;

impl LlamaConfig {
    /// Reads the config from a GGUF file's metadata (`{arch}.*` keys) and
    /// its `rope_freqs.weight`, as llama.cpp does.
    ///
    /// Errors: an architecture other than `llama` or `mistral`, missing or
    /// inconsistent keys, partial RoPE, or a RoPE scaling type we lack.
    pub fn from_gguf(weights: &GgufWeights) -> Result<Self, Error> {
        let h = weights.header();
        let arch = h.architecture()?.to_owned();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(Error::Unsupported(format!(
                "architecture {arch:?} (supported: llama, mistral)"
            )));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let uint = |k: &str| -> Result<usize, Error> {
            h.get(&key(k))
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| Error::Model(format!("missing or invalid metadata {}", key(k))))
        };
        let opt_uint = |k: &str| h.get(&key(k)).and_then(Value::as_u64).map(|v| v as usize);
        let float = |k: &str| h.get(&key(k)).and_then(Value::as_f64);

        let n_embd = uint("embedding_length")?;
        let n_head = uint("attention.head_count")?;
        let n_kv_head = opt_uint("attention.head_count_kv").unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 || n_embd % n_head != 0 {
            return Err(Error::Model(format!(
                "inconsistent heads: {n_head} q-heads, {n_kv_head} kv-heads, width {n_embd}"
            )));
        }
        let head_dim = opt_uint("attention.key_length").unwrap_or(n_embd / n_head);
        if let Some(rope_dims) = opt_uint("rope.dimension_count") {
            if rope_dims != head_dim {
                return Err(Error::Unsupported(format!(
                    "partial RoPE ({rope_dims} of {head_dim} dims)"
                )));
            }
        }
        let embd = h
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::Model("the model has no token_embd.weight".into()))?;
        let vocab_size = embd.dims.get(1).copied().unwrap_or(0) as usize;
        let rope_linear_scale = match h.get(&key("rope.scaling.type")).and_then(Value::as_str) {
            None | Some("none") => 1.0,
            Some("linear") => float("rope.scaling.factor").unwrap_or(1.0) as f32,
            Some(other) => return Err(Error::Unsupported(format!("RoPE scaling {other:?}"))),
        };
        let rope_freq_factors = match h.tensor("rope_freqs.weight") {
            Some(_) => Some(
                weights
                    .gguf_tensor("rope_freqs.weight")?
                    .to_f32()?
                    .to_vec1::<f32>()?,
            ),
            None => None,
        };
        Ok(Self {
            n_layers: uint("block_count")?,
            n_embd,
            n_ff: uint("feed_forward_length")?,
            n_head,
            n_kv_head,
            head_dim,
            vocab_size,
            context_length: opt_uint("context_length").unwrap_or(4096),
            rms_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_freq_base: float("rope.freq_base").unwrap_or(10_000.0) as f32,
            rope_linear_scale,
            rope_freq_factors,
            tie_word_embeddings: None,
            sliding_window: opt_uint("attention.sliding_window").filter(|&w| w > 0),
            architecture: arch,
        })
    }
}
