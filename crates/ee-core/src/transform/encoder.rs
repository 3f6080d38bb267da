//! The EE transform of a BERT-family encoder (BERT, DistilBERT, in the
//! Hugging Face layout): every tensor of the checkpoint moves under the
//! key, so that the server computes on encrypted token IDs **and** in
//! permuted hidden coordinates, and returns embeddings and class
//! probabilities the user's key alone can read.
//!
//! What moves (`[out, in]` matrices, per `../docs/ee-design.md`):
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

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::{Error, Key, Permutation};

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

const RESIDUAL_DOMAIN: &str = "ee/v1/encoder/residual";
const HEAD_DENSE_DOMAIN: &str = "ee/v1/encoder/head-dense";
const LABELS_DOMAIN: &str = "ee/v1/encoder/labels";

/// σ: the residual-channel permutation of an encoder `hidden` wide. The
/// server's embeddings come back permuted by it.
pub fn residual_permutation(key: &Key, hidden: u32) -> Permutation {
    key.permutation_for(RESIDUAL_DOMAIN, hidden)
}

/// λ: the permutation of a classifier's `labels` classes. The server's
/// probabilities come back permuted by it.
pub fn label_permutation(key: &Key, labels: u32) -> Permutation {
    key.permutation_for(LABELS_DOMAIN, labels)
}

/// What one axis of a tensor is indexed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Axis {
    /// Not permuted (positions, token types).
    Fixed,
    Vocab,
    Residual,
    Ffn(usize),
    /// Attention channels of layer `l`, moved by head.
    Heads(usize),
    /// The classification head's hidden channels (BERT's pooler,
    /// DistilBERT's `pre_classifier`).
    HeadDense,
    Labels,
}

/// The axes of the tensor `name` (outermost first), or `None` for a tensor
/// that is not part of a BERT/DistilBERT encoder or its classification head.
fn axes(name: &str) -> Option<Vec<Axis>> {
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
        | "attention.v_lin" => linear(Heads(l), Residual),
        "attention.output.dense" | "attention.out_lin" => linear(Residual, Heads(l)),
        "attention.output.LayerNorm"
        | "output.LayerNorm"
        | "sa_layer_norm"
        | "output_layer_norm" => Some(vec![Residual]),
        "intermediate.dense" | "ffn.lin1" => linear(Ffn(l), Residual),
        "output.dense" | "ffn.lin2" => linear(Residual, Ffn(l)),
        _ => None,
    }
}

/// The permutations of one key over one encoder, derived as tensors ask.
pub struct EncoderPermutations<'k> {
    key: &'k Key,
    vocab: Permutation,
    heads: usize,
    derived: HashMap<Axis, Permutation>,
}

impl<'k> EncoderPermutations<'k> {
    /// `vocab` is π; `heads` the attention heads per layer
    /// (`num_attention_heads`, DistilBERT's `n_heads`).
    pub fn new(key: &'k Key, vocab: Permutation, heads: usize) -> Self {
        Self {
            key,
            vocab,
            heads,
            derived: HashMap::new(),
        }
    }

    /// The permutation of an axis `n` long. An axis is as long in every
    /// tensor that has it: a tensor that disagrees is an error, not a
    /// second, different permutation.
    fn of(&mut self, axis: Axis, n: usize) -> Result<Option<&Permutation>, Error> {
        let (key, heads) = (self.key, self.heads);
        match axis {
            Axis::Fixed => return Ok(None),
            Axis::Vocab if self.vocab.len() != n => {
                return Err(Error::Permutation(format!(
                    "{n} embedding rows, but the vocabulary has {}",
                    self.vocab.len()
                )))
            }
            Axis::Vocab => return Ok(Some(&self.vocab)),
            _ => {}
        }
        if let Some(known) = self.derived.get(&axis).filter(|p| p.len() != n) {
            return Err(Error::Permutation(format!(
                "{axis:?} is {n} long here but {} elsewhere",
                known.len()
            )));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = self.derived.entry(axis) {
            let perm = match axis {
                Axis::Residual => residual_permutation(key, n as u32),
                Axis::Labels => label_permutation(key, n as u32),
                Axis::HeadDense => key.permutation_for(HEAD_DENSE_DOMAIN, n as u32),
                Axis::Ffn(l) => key.permutation_for(&format!("ee/v1/encoder/ffn/{l}"), n as u32),
                Axis::Heads(l) => {
                    if heads == 0 || !n.is_multiple_of(heads) {
                        return Err(Error::Permutation(format!(
                            "{n} attention channels do not split into {heads} heads"
                        )));
                    }
                    let by_head =
                        key.permutation_for(&format!("ee/v1/encoder/heads/{l}"), heads as u32);
                    let width = n / heads;
                    // Channel j of head h moves to channel j of head η(h).
                    let forward = (0..n)
                        .map(|c| {
                            let head = by_head.encrypt((c / width) as u32).expect("h < heads");
                            (head as usize * width + c % width) as u32
                        })
                        .collect();
                    Permutation::from_forward(forward)?
                }
                Axis::Fixed | Axis::Vocab => unreachable!("returned above"),
            };
            slot.insert(perm);
        }
        Ok(self.derived.get(&axis))
    }

    /// The bytes of tensor `name` (row-major `shape`, `element` bytes per
    /// value) with each axis moved: `out[p₀(i)][p₁(j)] = in[i][j]`.
    ///
    /// Errors: a tensor an encoder does not have (copying it unmoved would
    /// leave the model broken or leaking), or a shape its axes do not fit.
    pub fn permute(
        &mut self,
        name: &str,
        shape: &[usize],
        element: usize,
        bytes: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let axes = axes(name).ok_or_else(|| {
            Error::Permutation(format!(
                "tensor {name} is not part of a BERT/DistilBERT encoder or its \
                 sequence-classification head; refusing to copy it unencrypted"
            ))
        })?;
        if axes.is_empty() {
            return Ok(bytes.to_vec());
        }
        let misfit = || {
            Error::Permutation(format!(
                "tensor {name} has shape {shape:?}, not the {} axes of {axes:?}",
                axes.len()
            ))
        };
        if shape.len() != axes.len() || bytes.len() != shape.iter().product::<usize>() * element {
            return Err(misfit());
        }
        let rows = self.of(axes[0], shape[0])?.cloned();
        let cols = match axes.get(1) {
            Some(&a) => self.of(a, shape[1])?.cloned(),
            None => None,
        };
        let n_cols = shape.get(1).copied().unwrap_or(1);
        let row_bytes = n_cols * element;
        if row_bytes == 0 {
            return Ok(Vec::new()); // no values: nothing to move
        }
        let mut out = vec![0u8; bytes.len()];
        for (r, src) in bytes.chunks_exact(row_bytes).enumerate() {
            let r2 = rows
                .as_ref()
                .map_or(Some(r as u32), |p| p.encrypt(r as u32));
            let r2 = r2.ok_or_else(misfit)? as usize;
            let dst = &mut out[r2 * row_bytes..(r2 + 1) * row_bytes];
            match &cols {
                None => dst.copy_from_slice(src),
                Some(p) => {
                    for (c, value) in src.chunks_exact(element).enumerate() {
                        let c2 = p.encrypt(c as u32).ok_or_else(misfit)? as usize;
                        dst[c2 * element..(c2 + 1) * element].copy_from_slice(value);
                    }
                }
            }
        }
        Ok(out)
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
            ("encoder.layer.3.attention.self.key.bias", vec![Heads(3)]),
            (
                "bert.encoder.layer.0.attention.output.dense.weight",
                vec![Residual, Heads(0)],
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
                vec![Heads(1), Residual],
            ),
            ("pre_classifier.bias", vec![HeadDense]),
            ("classifier.weight", vec![Labels, HeadDense]),
        ] {
            assert_eq!(axes(name), Some(expected), "{name}");
        }
        for unknown in [
            "cls.predictions.bias",
            "encoder.layer.x.output.dense.weight",
            "lm_head.weight",
        ] {
            assert_eq!(axes(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn values_move_whole_and_heads_move_in_blocks() {
        // A key that swaps layer 0's two heads (half of keys do).
        let key = (0u8..)
            .map(|b| Key::from_bytes([b; 32]))
            .find(|k| !k.permutation_for("ee/v1/encoder/heads/0", 2).is_identity())
            .unwrap();
        let mut perms = EncoderPermutations::new(&key, Permutation::identity(1), 2);
        // A [4, 3] query weight of 2 heads × 2 channels over 3 residual
        // channels: value (i, j) lands at (η-block(i), σ(j)).
        let values: Vec<u8> = (0..12u8).collect();
        let out = perms
            .permute(
                "encoder.layer.0.attention.self.query.weight",
                &[4, 3],
                1,
                &values,
            )
            .unwrap();
        let sigma = residual_permutation(&key, 3);
        let heads = perms.of(Axis::Heads(0), 4).unwrap().unwrap().clone();
        assert!(!heads.is_identity(), "this key swaps the two heads");
        for i in 0..4u32 {
            // Channels keep their place within a head.
            assert_eq!(heads.encrypt(i).unwrap() % 2, i % 2);
            for j in 0..3u32 {
                let (i2, j2) = (heads.encrypt(i).unwrap(), sigma.encrypt(j).unwrap());
                assert_eq!(out[(i2 * 3 + j2) as usize], values[(i * 3 + j) as usize]);
            }
        }
        let mut sorted = out.clone();
        sorted.sort();
        assert_eq!(sorted, values);
        let err = perms
            .permute(
                "encoder.layer.0.attention.self.query.weight",
                &[4, 2],
                1,
                &values[..8],
            )
            .unwrap_err();
        assert!(err.to_string().contains("elsewhere"), "{err}");
        let err = perms
            .permute(
                "encoder.layer.0.attention.self.query.bias",
                &[5],
                1,
                &values[..4],
            )
            .unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        let err = perms
            .permute("cls.predictions.bias", &[1], 1, &[0])
            .unwrap_err();
        assert!(err.to_string().contains("unencrypted"), "{err}");
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

    #[test]
    fn the_identity_key_moves_nothing() {
        let key = Key::identity();
        let mut perms = EncoderPermutations::new(&key, Permutation::identity(4), 2);
        let values: Vec<u8> = (0..32).collect();
        for name in [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.value.weight",
        ] {
            assert_eq!(perms.permute(name, &[4, 4], 2, &values).unwrap(), values);
        }
    }
}
