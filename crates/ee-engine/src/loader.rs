//! Loading a model from disk: the file is mapped once, its config read,
//! and the architecture built from its weights. One arm per file format.

use std::path::Path;
use std::sync::Arc;

use crate::config::LlamaConfig;
use crate::linear::LoadOptions;
use crate::model::CausalLm;
use crate::weights::gguf::GgufWeights;
use crate::{models, Error};

/// A model's files, mapped and with their headers parsed.
pub enum ModelFiles {
    /// A GGUF file (quantized or float).
    Gguf(GgufWeights),
}

impl ModelFiles {
    /// Maps the model at `path`: a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Ok(Self::Gguf(GgufWeights::open(path)?))
    }

    /// The sha256 of the model's bytes, as lowercase hex: the fingerprint a
    /// client checks the server's artifact by. Read from the same map as
    /// the weights, so the file is read from disk once.
    pub fn sha256(&self) -> String {
        match self {
            Self::Gguf(w) => w.sha256(),
        }
    }

    /// Reads the config and builds the model.
    pub fn load(&self, opts: &LoadOptions) -> Result<Arc<dyn CausalLm>, Error> {
        match self {
            Self::Gguf(w) => models::build(LlamaConfig::from_gguf(w)?, w, opts),
        }
    }
}

/// Loads the (plaintext or EE-transformed) model at `path` onto the CPU.
pub fn load(path: &Path) -> Result<Arc<dyn CausalLm>, Error> {
    load_with(path, &LoadOptions::default())
}

/// [`load`] with options.
pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Arc<dyn CausalLm>, Error> {
    ModelFiles::open(path)?.load(opts)
}
