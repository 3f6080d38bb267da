//! Architectures, one file each: decoders behind [`CausalLm`], encoders
//! behind [`Encoder`].

pub mod bert;
pub mod distilbert;
pub mod llama;

use std::sync::Arc;

use crate::config::encoder::EncoderConfig;
use crate::config::LlamaConfig;
use crate::encoder::Encoder;
use crate::linear::LoadOptions;
use crate::model::CausalLm;
use crate::weights::WeightSource;
use crate::Error;

/// Builds the architecture `config` names from `weights`.
pub fn build(
    config: LlamaConfig,
    weights: &dyn WeightSource,
    opts: &LoadOptions,
) -> Result<Arc<dyn CausalLm>, Error> {
    match config.architecture.as_str() {
        "llama" | "mistral" => Ok(Arc::new(llama::LlamaModel::new(config, weights, opts)?)),
        other => Err(Error::Unsupported(format!(
            "architecture {other:?} (supported: llama, mistral)"
        ))),
    }
}

/// Builds the encoder `config` names from `weights`.
pub fn build_encoder(
    config: EncoderConfig,
    weights: &dyn WeightSource,
) -> Result<Arc<dyn Encoder>, Error> {
    match config.architecture.as_str() {
        "bert" => Ok(Arc::new(bert::load(config, weights)?)),
        "distilbert" => Ok(Arc::new(distilbert::load(config, weights)?)),
        other => Err(Error::Unsupported(format!(
            "encoder architecture {other:?} (supported: bert, distilbert)"
        ))),
    }
}
