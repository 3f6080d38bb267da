//! The EE transform of a BERT-family encoder (BERT, DistilBERT, in the
//! Hugging Face layout): every tensor of the checkpoint moves under the
//! key, so that the server computes on encrypted token IDs **and** in
//! permuted hidden coordinates, and returns embeddings and class
//! probabilities the user's key alone can read.
//!
//! What moves (`[out, in]` matrices, per `../shared/docs/ee-design.md`):
//! - token rows of `word_embeddings` by the vocabulary permutation π, so
//!   `[CLS]`, `[SEP]`, `[PAD]` and `[MASK]` are encrypted like every token;
//! - residual channels by σ: the columns of every embedding table and of
//!   every matrix reading the residual stream, the rows (and biases) of
//!   every matrix writing it, and every LayerNorm weight and bias
//!   (LayerNorm's mean and variance do not depend on channel order);
//! - per layer, FFN channels by τₗ (rows of the up projection, columns of
//!   the down one; GELU acts per channel) and attention heads by ηₗ in
//!   blocks of `head_dim` (rows of q/k/v, columns of the output projection);
//! - the classification head's hidden channels by ρ and its classes by λ,
//!   so the server never holds the label order.
//!
//! Every move copies values (bytes), so the encrypted model computes the
//! plaintext one's function; only the order of float sums (matmul inner
//! products over permuted columns, LayerNorm's reductions) changes, which
//! moves results by float rounding (measured in the encoder tests).
//! Pooling and L2 normalisation act per channel, so the server's pooled
//! embedding is the plaintext one permuted by σ; the client applies σ⁻¹.

use serde_json::{Map, Value};

use super::channels::Axis;

/// The encoder architectures a `config.json` may name.
pub const ENCODER_ARCHITECTURES: [&str; 4] = [
    "BertModel",
    "BertForSequenceClassification",
    "DistilBertModel",
    "DistilBertForSequenceClassification",
];

/// Whether `config` (a `config.json`) names an encoder architecture.
pub fn is_encoder_config(config: &Map<String, Value>) -> bool {
    architecture(config).is_some_and(|n| ENCODER_ARCHITECTURES.contains(&n))
}

/// The architecture `config` names (`architectures[0]`).
fn architecture(config: &Map<String, Value>) -> Option<&str> {
    config.get("architectures")?.get(0)?.as_str()
}

/// A sequence classifier's classes by index, `None` for a model without a
/// classification head: `id2label`'s names where they cover `0..n`
/// exactly, else transformers' default names `LABEL_i` for its
/// `num_labels` (`id2label`'s size, or the key a server artifact keeps,
/// or transformers' default of 2).
pub fn classifier_labels(config: &Map<String, Value>) -> Option<Vec<String>> {
    if !architecture(config)?.ends_with("ForSequenceClassification") {
        return None;
    }
    let named = config.get("id2label").and_then(Value::as_object);
    if let Some(labels) = named.filter(|l| !l.is_empty()) {
        let names: Option<Vec<String>> = (0..labels.len())
            .map(|i| labels.get(&i.to_string())?.as_str().map(str::to_owned))
            .collect();
        return Some(names.unwrap_or_else(|| default_names(labels.len())));
    }
    let n = config
        .get("num_labels")
        .and_then(Value::as_u64)
        .unwrap_or(2);
    Some(default_names(n as usize))
}

fn default_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("LABEL_{i}")).collect()
}

/// The axes of the tensor `name` (outermost first), or `None` for a tensor
/// that is not part of a BERT/DistilBERT encoder or its classification head.
pub fn encoder_axes(name: &str) -> Option<Vec<Axis>> {
    use Axis::*;
    let name = name
        .strip_prefix("bert.")
        .or_else(|| name.strip_prefix("distilbert."))
        .unwrap_or(name);
    let (stem, kind) = name.rsplit_once('.')?;
    let weight = match kind {
        "weight" => true,
        "bias" => false,
        _ => return (name == "embeddings.position_ids").then(Vec::new),
    };
    // (rows, columns) of a projection; a bias follows its rows.
    let linear = |rows: Axis, cols: Axis| Some(if weight { vec![rows, cols] } else { vec![rows] });
    match stem {
        "embeddings.word_embeddings" if weight => return Some(vec![Vocab, Residual]),
        "embeddings.position_embeddings" | "embeddings.token_type_embeddings" if weight => {
            return Some(vec![Fixed, Residual])
        }
        "embeddings.LayerNorm" => return Some(vec![Residual]),
        "pooler.dense" | "pre_classifier" => return linear(HeadDense, Residual),
        "classifier" => return linear(Labels, HeadDense),
        _ => {}
    }
    let rest = stem
        .strip_prefix("encoder.layer.")
        .or_else(|| stem.strip_prefix("transformer.layer."))?;
    let (layer, part) = rest.split_once('.')?;
    let l: usize = layer.parse().ok()?;
    match part {
        "attention.self.query"
        | "attention.self.key"
        | "attention.self.value"
        | "attention.q_lin"
        | "attention.k_lin"
        | "attention.v_lin" => linear(Heads { layer: l, group: 1 }, Residual),
        "attention.output.dense" | "attention.out_lin" => {
            linear(Residual, Heads { layer: l, group: 1 })
        }
        "attention.output.LayerNorm"
        | "output.LayerNorm"
        | "sa_layer_norm"
        | "output_layer_norm" => Some(vec![Residual]),
        "intermediate.dense" | "ffn.lin1" => linear(Ffn(l), Residual),
        "output.dense" | "ffn.lin2" => linear(Residual, Ffn(l)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bert_and_distilbert_tensor_has_its_axes() {
        use Axis::*;
        for (name, expected) in [
            ("embeddings.word_embeddings.weight", vec![Vocab, Residual]),
            (
                "bert.embeddings.token_type_embeddings.weight",
                vec![Fixed, Residual],
            ),
            ("embeddings.position_ids", vec![]),
            (
                "encoder.layer.3.attention.self.key.bias",
                vec![Heads { layer: 3, group: 1 }],
            ),
            (
                "bert.encoder.layer.0.attention.output.dense.weight",
                vec![Residual, Heads { layer: 0, group: 1 }],
            ),
            (
                "encoder.layer.5.output.dense.weight",
                vec![Residual, Ffn(5)],
            ),
            ("encoder.layer.5.output.LayerNorm.bias", vec![Residual]),
            (
                "distilbert.transformer.layer.1.ffn.lin1.weight",
                vec![Ffn(1), Residual],
            ),
            (
                "distilbert.transformer.layer.1.attention.q_lin.weight",
                vec![Heads { layer: 1, group: 1 }, Residual],
            ),
            ("pre_classifier.bias", vec![HeadDense]),
            ("classifier.weight", vec![Labels, HeadDense]),
        ] {
            assert_eq!(encoder_axes(name), Some(expected), "{name}");
        }
        for unknown in [
            "cls.predictions.bias",
            "encoder.layer.x.output.dense.weight",
            "lm_head.weight",
        ] {
            assert_eq!(encoder_axes(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn classifier_labels_are_named_or_counted() {
        let config = |v: serde_json::Value| v.as_object().unwrap().clone();
        let bert = |extra: serde_json::Value| {
            let mut c =
                config(serde_json::json!({"architectures": ["BertForSequenceClassification"]}));
            c.extend(config(extra));
            classifier_labels(&c)
        };
        assert_eq!(
            bert(serde_json::json!({"id2label": {"1": "POS", "0": "NEG"}})),
            Some(vec!["NEG".into(), "POS".into()])
        );
        assert_eq!(
            bert(serde_json::json!({"id2label": {"0": "NEG", "2": "POS"}})),
            Some(vec!["LABEL_0".into(), "LABEL_1".into()])
        );
        assert_eq!(
            bert(serde_json::json!({"num_labels": 3})).map(|l| l.len()),
            Some(3)
        );
        assert_eq!(bert(serde_json::json!({})).map(|l| l.len()), Some(2));
        let plain =
            config(serde_json::json!({"architectures": ["BertModel"], "id2label": {"0": "A"}}));
        assert_eq!(classifier_labels(&plain), None);
    }
}
