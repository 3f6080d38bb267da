//! The config from a Hugging Face `config.json` (`LlamaForCausalLM`,
//! `MistralForCausalLM`), read as transformers' `LlamaConfig` and
//! `MistralConfig` define it.

use std::path::Path;

use serde::Deserialize;

use super::LlamaConfig;
use crate::Error;

/// The architectures a `config.json` may name, and ours for each.
const ARCHITECTURES: [(&str, &str); 2] = [
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
];

/// `MistralConfig.sliding_window` when `config.json` does not set it.
const MISTRAL_DEFAULT_SLIDING_WINDOW: usize = 4096;

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    rope_scaling: Option<RopeScaling>,
    sliding_window: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

/// `rope_scaling`: transformers names the kind `rope_type` (older files:
/// `type`).
#[derive(Deserialize)]
struct RopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

impl LlamaConfig {
    /// Parses `json`, the contents of the `config.json` at `path` (which
    /// errors name).
    ///
    /// Errors (naming the file): it is malformed, names another
    /// architecture, or uses what our forward pass lacks (biases, an
    /// activation other than SiLU, a RoPE scaling other than `linear` or
    /// `llama3`).
    pub fn from_hf_config(path: &Path, json: &[u8]) -> Result<Self, Error> {
        let at = |e: String| Error::Model(format!("{}: {e}", path.display()));
        let c: HfConfig = serde_json::from_slice(json).map_err(|e| at(e.to_string()))?;
        // transformers' MistralConfig defaults the window to 4096 when the
        // key is absent; an explicit null means none.
        let raw: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(json).map_err(|e| at(e.to_string()))?;
        let sliding_window = match raw.contains_key("sliding_window") {
            true => c.sliding_window.filter(|&w| w > 0),
            false => Some(MISTRAL_DEFAULT_SLIDING_WINDOW),
        };
        let named = c.architectures.first().map(String::as_str).unwrap_or("");
        let architecture = ARCHITECTURES
            .iter()
            .find(|(hf, _)| *hf == named)
            .map(|(_, ours)| (*ours).to_owned())
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{}: architecture {named:?} (supported: LlamaForCausalLM, MistralForCausalLM)",
                    path.display()
                ))
            })?;
        let unsupported = |what: String| Error::Unsupported(format!("{}: {what}", path.display()));
        if let Some(act) = c.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(unsupported(format!("hidden_act {act:?} (supported: silu)")));
        }
        if c.attention_bias || c.mlp_bias {
            return Err(unsupported("attention or MLP biases".into()));
        }
        let n_head = c.num_attention_heads;
        let n_kv_head = c.num_key_value_heads.unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(at(format!(
                "inconsistent heads: {n_head} attention heads, {n_kv_head} key/value heads"
            )));
        }
        let head_dim = match c.head_dim {
            Some(d) => d,
            None if c.hidden_size.is_multiple_of(n_head) => c.hidden_size / n_head,
            None => {
                return Err(at(format!(
                    "hidden_size {} is not a multiple of {n_head} heads",
                    c.hidden_size
                )))
            }
        };
        if head_dim % 2 != 0 {
            return Err(at(format!("head_dim {head_dim} is odd")));
        }
        let rope_freq_base = c.rope_theta.unwrap_or(10_000.0);
        let (mut rope_linear_scale, mut rope_freq_factors) = (1.0, None);
        if let Some(s) = &c.rope_scaling {
            let kind = s
                .rope_type
                .as_deref()
                .or(s.kind.as_deref())
                .unwrap_or("default");
            let factor = || {
                s.factor
                    .ok_or_else(|| at(format!("rope_scaling {kind:?} needs a factor")))
            };
            match kind {
                "default" => {}
                "linear" => rope_linear_scale = factor()?,
                "llama3" => {
                    let (Some(low), Some(high), Some(original)) = (
                        s.low_freq_factor,
                        s.high_freq_factor,
                        s.original_max_position_embeddings,
                    ) else {
                        return Err(at("rope_scaling llama3 needs low_freq_factor, high_freq_factor and original_max_position_embeddings".into()));
                    };
                    rope_freq_factors = Some(llama3_freq_factors(
                        rope_freq_base,
                        head_dim,
                        factor()?,
                        low,
                        high,
                        original as f32,
                    ));
                }
                other => {
                    return Err(unsupported(format!(
                        "RoPE scaling {other:?} (supported: linear, llama3)"
                    )))
                }
            }
        }
        Ok(Self {
            sliding_window: match architecture.as_str() {
                "mistral" => sliding_window,
                _ => None,
            },
            // transformers' default for both architectures.
            tie_word_embeddings: Some(c.tie_word_embeddings.unwrap_or(false)),
            architecture,
            n_layers: c.num_hidden_layers,
            n_embd: c.hidden_size,
            n_ff: c.intermediate_size,
            n_head,
            n_kv_head,
            head_dim,
            vocab_size: c.vocab_size,
            context_length: c.max_position_embeddings,
            rms_eps: c.rms_norm_eps,
            rope_freq_base,
            rope_linear_scale,
            rope_freq_factors,
        })
    }
}

/// Llama 3's long-context RoPE as divisors of the inverse frequencies, as
/// transformers' `_compute_llama3_parameters` and llama.cpp's
/// `rope_freqs.weight` define them: long wavelengths are slowed by
/// `factor`, short ones kept, and those between blended smoothly.
fn llama3_freq_factors(
    base: f32,
    head_dim: usize,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_context: f32,
) -> Vec<f32> {
    let low_freq_wavelen = original_context / low_freq_factor;
    let high_freq_wavelen = original_context / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / base.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                factor
            } else {
                let smooth = (original_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> Result<LlamaConfig, Error> {
        LlamaConfig::from_hf_config(Path::new("m/config.json"), v.to_string().as_bytes())
    }

    fn llama() -> serde_json::Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "vocab_size": 300, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": true,
               "sliding_window": 4})
    }

    #[test]
    fn a_llama_config_reads_with_defaults_and_llama_ignores_sliding_window() {
        let c = config(llama()).unwrap();
        assert_eq!(
            (c.architecture.as_str(), c.head_dim, c.n_kv_head),
            ("llama", 16, 2)
        );
        assert_eq!(
            (c.context_length, c.rope_freq_base, c.sliding_window),
            (256, 500000.0, None)
        );
        let mut m = llama();
        m["architectures"] = json!(["MistralForCausalLM"]);
        m["head_dim"] = json!(32);
        let c = config(m.clone()).unwrap();
        assert_eq!(
            (c.architecture.as_str(), c.head_dim, c.sliding_window),
            ("mistral", 32, Some(4))
        );
        assert_eq!(c.tie_word_embeddings, Some(true));
        m.as_object_mut().unwrap().remove("sliding_window");
        m.as_object_mut().unwrap().remove("tie_word_embeddings");
        let c = config(m.clone()).unwrap();
        assert_eq!(
            (c.sliding_window, c.tie_word_embeddings),
            (Some(4096), Some(false))
        );
        m["sliding_window"] = json!(null);
        assert_eq!(config(m).unwrap().sliding_window, None);
    }

    #[test]
    fn rope_scalings_become_factors_or_a_linear_scale() {
        let mut m = llama();
        m["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let f = config(m).unwrap().rope_freq_factors.unwrap();
        assert_eq!(f.len(), 8);
        assert_eq!(f[0], 1.0, "the highest frequency is kept");
        assert_eq!(
            *f.last().unwrap(),
            8.0,
            "the lowest is slowed by the factor"
        );
        assert!(f.windows(2).all(|w| w[0] <= w[1]));
        let mut m = llama();
        m["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        assert_eq!(config(m).unwrap().rope_linear_scale, 2.0);
    }

    #[test]
    fn what_we_lack_is_refused_by_name() {
        for (key, value, needle) in [
            (
                "architectures",
                json!(["Qwen2ForCausalLM"]),
                "Qwen2ForCausalLM",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": 4.0}),
                "yarn",
            ),
            ("hidden_act", json!("gelu"), "gelu"),
            ("attention_bias", json!(true), "biases"),
            ("num_key_value_heads", json!(3), "inconsistent heads"),
            ("hidden_size", json!("big"), "config.json"),
        ] {
            let mut m = llama();
            m[key] = value;
            let err = config(m).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
    }
}
