//! DistilBERT (`DistilBertModel`, `DistilBertForSequenceClassification`),
//! as transformers' `modeling_distilbert.py` and candle-transformers'
//! `distilbert.rs` define it: BERT's post-LayerNorm blocks (`bert.rs`)
//! under other tensor names, learned positions and no token types, and a
//! head of `pre_classifier`, ReLU and `classifier` on the first token.

use super::bert::{EncoderModel, HeadActivation, LayerNames, Naming};
use crate::config::encoder::EncoderConfig;
use crate::weights::WeightSource;
use crate::Error;

const DISTILBERT: Naming = Naming {
    prefix: "distilbert.",
    layers: "transformer.layer",
    layer: LayerNames {
        query: "attention.q_lin",
        key: "attention.k_lin",
        value: "attention.v_lin",
        attn_out: "attention.out_lin",
        attn_norm: "sa_layer_norm",
        up: "ffn.lin1",
        down: "ffn.lin2",
        out_norm: "output_layer_norm",
    },
    head_dense: "pre_classifier",
    head_activation: HeadActivation::Relu,
};

/// Loads DistilBERT. A classifier's tensors sit under `distilbert.` (its
/// head at the root); a bare `DistilBertModel` saved alone has none.
pub fn load(config: EncoderConfig, src: &dyn WeightSource) -> Result<EncoderModel, Error> {
    EncoderModel::load(config, src, &DISTILBERT)
}
