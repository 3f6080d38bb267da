//! The config of a BERT-family encoder, from a Hugging Face `config.json`
//! (`BertModel`, `BertForSequenceClassification`, `DistilBertModel`,
//! `DistilBertForSequenceClassification`, as transformers' `BertConfig` and
//! `DistilBertConfig` define them), and its sentence-transformers pooling
//! (`modules.json`, `1_Pooling/config.json`) when the directory has them.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use ee_core::sentence_transformers::read_modules;
use ee_core::transform::encoder::{classifier_labels, is_encoder_config, ENCODER_ARCHITECTURES};

use crate::encoder::{Pooling, PoolingMode};
use crate::Error;

/// `DistilBertConfig` has no `layer_norm_eps`: transformers hard-codes it.
const DISTILBERT_LAYER_NORM_EPS: f64 = 1e-12;

/// The activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// transformers' `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

/// The hyper-parameters of a BERT-family encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    /// `bert` or `distilbert`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub intermediate_size: usize,
    /// Positions the model has embeddings for: its longest input.
    pub max_positions: usize,
    /// Rows of `token_type_embeddings` (BERT; 0 for DistilBERT).
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// Classes of a sequence-classification head; `None` for a bare model.
    pub num_labels: Option<usize>,
    /// How token states become one embedding.
    pub pooling: Pooling,
}

#[derive(Deserialize)]
struct BertFields {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    #[serde(default = "two")]
    type_vocab_size: usize,
    #[serde(default = "bert_eps")]
    layer_norm_eps: f64,
    #[serde(default = "gelu")]
    hidden_act: String,
    position_embedding_type: Option<String>,
}

#[derive(Deserialize)]
struct DistilBertFields {
    dim: usize,
    n_layers: usize,
    n_heads: usize,
    hidden_dim: usize,
    max_position_embeddings: usize,
    #[serde(default = "gelu")]
    activation: String,
    #[serde(default)]
    sinusoidal_pos_embds: bool,
}

fn two() -> usize {
    2
}
fn bert_eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}

impl EncoderConfig {
    /// Reads the encoder of the checkpoint whose `config.json` (at `path`)
    /// holds `json`; the pooling files are looked for beside it.
    ///
    /// Errors (naming the file): a malformed config, another architecture,
    /// what our forward pass lacks (relative position embeddings,
    /// sinusoidal DistilBERT positions, an unknown activation, regression or
    /// multi-label heads), or pooling we do not implement.
    pub fn from_hf_config(path: &Path, json: &[u8]) -> Result<Self, Error> {
        let at = |e: String| Error::Model(format!("{}: {e}", path.display()));
        let unsupported = |what: String| Error::Unsupported(format!("{}: {what}", path.display()));
        let raw: Map<String, Value> =
            serde_json::from_slice(json).map_err(|e| at(e.to_string()))?;
        let named = raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("");
        if !is_encoder_config(&raw) {
            return Err(unsupported(format!(
                "architecture {named:?} is not an encoder (supported: {ENCODER_ARCHITECTURES:?})"
            )));
        }
        let architecture = match named.starts_with("DistilBert") {
            true => "distilbert",
            false => "bert",
        };
        let vocab_size = raw
            .get("vocab_size")
            .and_then(Value::as_u64)
            .filter(|&v| v > 0)
            .ok_or_else(|| at("no valid vocab_size".into()))? as usize;
        let num_labels = classifier_labels(&raw).map(|l| l.len());
        // transformers runs a one-output head as regression, and a
        // multi-label one through sigmoids: neither is a softmax.
        let problem = raw.get("problem_type").and_then(Value::as_str);
        let regression = num_labels == Some(1) || problem == Some("regression");
        if regression || problem == Some("multi_label_classification") {
            return Err(unsupported(format!(
                "a {} head (supported: single-label classification of 2 or more classes, \
                 softmax)",
                problem.unwrap_or("regression")
            )));
        }
        let value = Value::Object(raw.clone());
        let (hidden_size, n_layers, n_heads, intermediate_size, max_positions, types, eps, act) =
            match architecture {
                "bert" => {
                    let c: BertFields =
                        serde_json::from_value(value).map_err(|e| at(e.to_string()))?;
                    if let Some(kind) = c.position_embedding_type.filter(|k| k != "absolute") {
                        return Err(unsupported(format!(
                            "position_embedding_type {kind:?} (supported: absolute)"
                        )));
                    }
                    (
                        c.hidden_size,
                        c.num_hidden_layers,
                        c.num_attention_heads,
                        c.intermediate_size,
                        c.max_position_embeddings,
                        c.type_vocab_size,
                        c.layer_norm_eps,
                        c.hidden_act,
                    )
                }
                _ => {
                    let c: DistilBertFields =
                        serde_json::from_value(value).map_err(|e| at(e.to_string()))?;
                    if c.sinusoidal_pos_embds {
                        return Err(unsupported(
                            "sinusoidal_pos_embds (supported: learned)".into(),
                        ));
                    }
                    (
                        c.dim,
                        c.n_layers,
                        c.n_heads,
                        c.hidden_dim,
                        c.max_position_embeddings,
                        0,
                        DISTILBERT_LAYER_NORM_EPS,
                        c.activation,
                    )
                }
            };
        let activation = match act.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(unsupported(format!(
                    "activation {other:?} (supported: gelu, gelu_new, relu)"
                )))
            }
        };
        if n_heads == 0 || !hidden_size.is_multiple_of(n_heads) {
            return Err(at(format!(
                "hidden size {hidden_size} is not a multiple of {n_heads} heads"
            )));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        Ok(Self {
            architecture: architecture.to_owned(),
            vocab_size,
            hidden_size,
            n_layers,
            n_heads,
            intermediate_size,
            max_positions,
            type_vocab_size: types,
            layer_norm_eps: eps,
            activation,
            num_labels,
            pooling: read_pooling(dir)?,
        })
    }

    /// Channels per attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_heads
    }
}

/// sentence-transformers' pooling ([`read_modules`]): the `Pooling`
/// module's mode, and whether `Normalize` follows. Without `modules.json`
/// this is what sentence-transformers builds for a plain Hugging Face
/// model: mean pooling, no normalisation.
fn read_pooling(dir: &Path) -> Result<Pooling, Error> {
    #[derive(Deserialize)]
    struct PoolingFile {
        #[serde(default)]
        pooling_mode_cls_token: bool,
        #[serde(default)]
        pooling_mode_mean_tokens: bool,
        #[serde(default)]
        pooling_mode_max_tokens: bool,
        #[serde(default)]
        pooling_mode_mean_sqrt_len_tokens: bool,
        #[serde(default)]
        pooling_mode_weightedmean_tokens: bool,
        #[serde(default)]
        pooling_mode_lasttoken: bool,
    }
    let Some(modules) = read_modules(dir)? else {
        return Ok(Pooling::default());
    };
    let normalize = modules.normalize;
    let Some(path) = modules.pooling_config else {
        return Ok(Pooling {
            mode: PoolingMode::Mean,
            normalize,
        });
    };
    let at = |e: String| Error::Model(format!("{}: {e}", path.display()));
    let bytes = std::fs::read(&path).map_err(|e| at(e.to_string()))?;
    let p: PoolingFile = serde_json::from_slice(&bytes).map_err(|e| at(e.to_string()))?;
    let modes = [
        (p.pooling_mode_cls_token, Some(PoolingMode::Cls)),
        (p.pooling_mode_mean_tokens, Some(PoolingMode::Mean)),
        (p.pooling_mode_max_tokens, Some(PoolingMode::Max)),
        (p.pooling_mode_mean_sqrt_len_tokens, None),
        (p.pooling_mode_weightedmean_tokens, None),
        (p.pooling_mode_lasttoken, None),
    ];
    let on: Vec<_> = modes.iter().filter(|(on, _)| *on).collect();
    match on[..] {
        [(_, Some(mode))] => Ok(Pooling {
            mode: *mode,
            normalize,
        }),
        _ => Err(Error::Unsupported(format!(
            "{}: pooling other than exactly one of cls, mean, max",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ee_core::sentence_transformers::MODULES_FILE;

    fn write(dir: &Path, name: &str, json: serde_json::Value) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, serde_json::to_vec(&json).unwrap()).unwrap();
    }

    fn bert(dir: &Path, extra: serde_json::Value) -> Result<EncoderConfig, Error> {
        let mut c = serde_json::json!({"architectures": ["BertModel"], "vocab_size": 100,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 16});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
        EncoderConfig::from_hf_config(&path, &std::fs::read(&path).unwrap())
    }

    #[test]
    fn pooling_is_read_from_sentence_transformers_files_or_defaults_to_mean() {
        let dir = tempfile::tempdir().unwrap();
        let c = bert(dir.path(), serde_json::json!({})).unwrap();
        assert_eq!(c.pooling, Pooling::default());
        assert_eq!((c.head_dim(), c.type_vocab_size), (8, 2));
        write(
            dir.path(),
            MODULES_FILE,
            serde_json::json!([{"path": "", "type": "sentence_transformers.models.Transformer"},
            {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]),
        );
        write(
            dir.path(),
            "1_Pooling/config.json",
            serde_json::json!({"pooling_mode_cls_token": true}),
        );
        let c = bert(dir.path(), serde_json::json!({})).unwrap();
        assert_eq!(
            c.pooling,
            Pooling {
                mode: PoolingMode::Cls,
                normalize: true
            }
        );
        write(
            dir.path(),
            "1_Pooling/config.json",
            serde_json::json!({"pooling_mode_mean_sqrt_len_tokens": true}),
        );
        let err = bert(dir.path(), serde_json::json!({})).unwrap_err();
        assert!(err.to_string().contains("1_Pooling"), "{err}");
    }

    #[test]
    fn heads_labels_and_unsupported_settings_are_read_or_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = bert(
            dir.path(),
            serde_json::json!({"architectures": ["BertForSequenceClassification"],
                "id2label": {"0": "NEG", "1": "POS", "2": "NEU"}}),
        )
        .unwrap();
        assert_eq!(c.num_labels, Some(3));
        let c = bert(
            dir.path(),
            serde_json::json!({"architectures": ["BertForSequenceClassification"],
                "num_labels": 2}),
        )
        .unwrap();
        assert_eq!(c.num_labels, Some(2));
        for (extra, named) in [
            (
                serde_json::json!({"position_embedding_type": "relative_key"}),
                "relative_key",
            ),
            (serde_json::json!({"hidden_act": "swish"}), "swish"),
            (
                serde_json::json!({"architectures": ["BertForSequenceClassification"],
                    "num_labels": 1}),
                "regression",
            ),
            (
                serde_json::json!({"architectures": ["BertForSequenceClassification"],
                    "problem_type": "multi_label_classification"}),
                "multi_label",
            ),
            (serde_json::json!({"num_attention_heads": 5}), "5 heads"),
        ] {
            let err = bert(dir.path(), extra).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
    }
}
