//! Architectures, one file each, all behind [`CausalLm`].

pub mod llama;

use std::sync::Arc;

use crate::config::LlamaConfig;
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
