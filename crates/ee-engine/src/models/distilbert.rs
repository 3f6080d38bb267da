//! DistilBERT (`DistilBertModel`, `DistilBertForSequenceClassification`),
//! as transformers' `modeling_distilbert.py` and candle-transformers'
//! `distilbert.rs` define it: BERT's post-LayerNorm blocks (`bert.rs`)
//! under other tensor names, learned positions and no token types, and a
//! head of `pre_classifier`, ReLU and `classifier` on the first token.

use super::bert::{
    ClassifierHead, Dense, Embeddings, EncoderLayer, EncoderModel, HeadActivation, LayerNames,
};
use crate::config::encoder::EncoderConfig;
use crate::weights::WeightSource;
use crate::Error;

const DISTILBERT_LAYER: LayerNames = LayerNames {
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    attn_out: "attention.out_lin",
    attn_norm: "sa_layer_norm",
    up: "ffn.lin1",
    down: "ffn.lin2",
    out_norm: "output_layer_norm",
};

/// Loads DistilBERT. A classifier's tensors sit under `distilbert.` (its
/// head at the root); a bare `DistilBertModel` saved alone has none.
pub fn load(config: EncoderConfig, src: &dyn WeightSource) -> Result<EncoderModel, Error> {
    let p = match src.contains("distilbert.embeddings.word_embeddings.weight") {
        true => "distilbert.",
        false => "",
    };
    let d = config.hidden_size;
    let layers = (0..config.n_layers)
        .map(|l| {
            EncoderLayer::load(
                src,
                &format!("{p}transformer.layer.{l}"),
                &DISTILBERT_LAYER,
                &config,
            )
        })
        .collect::<Result<_, _>>()?;
    let head = match config.num_labels {
        Some(labels) => Some(ClassifierHead {
            dense: Dense::load(src, "pre_classifier", d, d)?,
            activation: HeadActivation::Relu,
            classifier: Dense::load(src, "classifier", labels, d)?,
        }),
        None => None,
    };
    Ok(EncoderModel {
        embeddings: Embeddings::load(src, &format!("{p}embeddings"), &config)?,
        layers,
        head,
        config,
    })
}
