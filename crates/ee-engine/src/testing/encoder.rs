//! Tiny generated BERT-family checkpoints: `BertForSequenceClassification`
//! and `DistilBertForSequenceClassification` in the real Hugging Face
//! layout (tensors under `bert.` / `distilbert.`, the head at the root,
//! `id2label` in `config.json`), random f32 weights, around a real
//! vocabulary whose `tokenizer.json` is copied in beside them.

use std::path::Path;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use super::random_tensor;
use crate::Error;

/// Which classifier to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyEncoderKind {
    Bert,
    DistilBert,
}

/// The shape of a tiny classifier.
#[derive(Debug, Clone)]
pub struct TinyEncoderSpec {
    pub kind: TinyEncoderKind,
    pub vocab_size: usize,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub labels: Vec<String>,
    pub seed: u64,
}

impl TinyEncoderSpec {
    /// A three-class classifier of `kind` over `vocab_size` tokens.
    pub fn classifier(kind: TinyEncoderKind, vocab_size: usize) -> Self {
        Self {
            kind,
            vocab_size,
            hidden: 32,
            heads: 4,
            layers: 2,
            intermediate: 64,
            max_positions: 64,
            labels: ["negative", "neutral", "positive"]
                .map(String::from)
                .to_vec(),
            seed: 7,
        }
    }
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Model(e.to_string())
}

/// Writes a tiny classifier into `dir` (which must exist); copies
/// `tokenizer_json` in as `tokenizer.json` when given.
pub fn write_tiny_encoder(
    dir: &Path,
    spec: &TinyEncoderSpec,
    tokenizer_json: Option<&Path>,
) -> Result<(), Error> {
    let (d, f, v, p) = (
        spec.hidden,
        spec.intermediate,
        spec.vocab_size,
        spec.max_positions,
    );
    let labels = spec.labels.len();
    let id2label: serde_json::Map<String, serde_json::Value> = spec
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = spec
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    // (name, shape, scale); scale 0 marks a LayerNorm weight (around 1).
    let mut shapes: Vec<(String, Vec<usize>, f32)> = Vec::new();
    let linear = |shapes: &mut Vec<_>, name: String, out: usize, input: usize| {
        shapes.push((
            format!("{name}.weight"),
            vec![out, input],
            1.7 / (input as f32).sqrt(),
        ));
        shapes.push((format!("{name}.bias"), vec![out], 0.1));
    };
    let norm = |shapes: &mut Vec<(String, Vec<usize>, f32)>, name: String| {
        shapes.push((format!("{name}.weight"), vec![d], 0.0));
        shapes.push((format!("{name}.bias"), vec![d], 0.1));
    };
    let config = match spec.kind {
        TinyEncoderKind::Bert => {
            shapes.push((
                "bert.embeddings.word_embeddings.weight".into(),
                vec![v, d],
                1.0,
            ));
            shapes.push((
                "bert.embeddings.position_embeddings.weight".into(),
                vec![p, d],
                0.3,
            ));
            shapes.push((
                "bert.embeddings.token_type_embeddings.weight".into(),
                vec![2, d],
                0.3,
            ));
            norm(&mut shapes, "bert.embeddings.LayerNorm".into());
            for l in 0..spec.layers {
                let n = |t: &str| format!("bert.encoder.layer.{l}.{t}");
                for t in [
                    "attention.self.query",
                    "attention.self.key",
                    "attention.self.value",
                ] {
                    linear(&mut shapes, n(t), d, d);
                }
                linear(&mut shapes, n("attention.output.dense"), d, d);
                norm(&mut shapes, n("attention.output.LayerNorm"));
                linear(&mut shapes, n("intermediate.dense"), f, d);
                linear(&mut shapes, n("output.dense"), d, f);
                norm(&mut shapes, n("output.LayerNorm"));
            }
            linear(&mut shapes, "bert.pooler.dense".into(), d, d);
            linear(&mut shapes, "classifier".into(), labels, d);
            json!({"architectures": ["BertForSequenceClassification"], "model_type": "bert",
                "vocab_size": v, "hidden_size": d, "num_hidden_layers": spec.layers,
                "num_attention_heads": spec.heads, "intermediate_size": f,
                "max_position_embeddings": p, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
                "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
                "pad_token_id": 0, "position_embedding_type": "absolute",
                "id2label": id2label, "label2id": label2id})
        }
        TinyEncoderKind::DistilBert => {
            shapes.push((
                "distilbert.embeddings.word_embeddings.weight".into(),
                vec![v, d],
                1.0,
            ));
            shapes.push((
                "distilbert.embeddings.position_embeddings.weight".into(),
                vec![p, d],
                0.3,
            ));
            norm(&mut shapes, "distilbert.embeddings.LayerNorm".into());
            for l in 0..spec.layers {
                let n = |t: &str| format!("distilbert.transformer.layer.{l}.{t}");
                for t in [
                    "attention.q_lin",
                    "attention.k_lin",
                    "attention.v_lin",
                    "attention.out_lin",
                ] {
                    linear(&mut shapes, n(t), d, d);
                }
                norm(&mut shapes, n("sa_layer_norm"));
                linear(&mut shapes, n("ffn.lin1"), f, d);
                linear(&mut shapes, n("ffn.lin2"), d, f);
                norm(&mut shapes, n("output_layer_norm"));
            }
            linear(&mut shapes, "pre_classifier".into(), d, d);
            linear(&mut shapes, "classifier".into(), labels, d);
            json!({"architectures": ["DistilBertForSequenceClassification"],
                "model_type": "distilbert", "vocab_size": v, "dim": d,
                "n_layers": spec.layers, "n_heads": spec.heads, "hidden_dim": f,
                "max_position_embeddings": p, "activation": "gelu", "dropout": 0.1,
                "attention_dropout": 0.1, "initializer_range": 0.02, "pad_token_id": 0,
                "sinusoidal_pos_embds": false, "seq_classif_dropout": 0.2,
                "id2label": id2label, "label2id": label2id})
        }
    };
    let mut rng = ChaCha20Rng::seed_from_u64(spec.seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, scale) in shapes {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match scale {
            0.0 => random_tensor(&mut rng, (1, n), 0.2)?.affine(1.0, 1.0)?,
            s => random_tensor(&mut rng, (1, n), s)?,
        }
        .flatten_all()?
        .to_vec1()?;
        tensors.push((
            name,
            shape,
            values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| err(format!("{e:?}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors"))
        .map_err(|e| err(format!("{e:?}")))?;
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(err)?;
    if let Some(tokenizer) = tokenizer_json {
        std::fs::copy(tokenizer, dir.join("tokenizer.json")).map_err(err)?;
    }
    Ok(())
}
