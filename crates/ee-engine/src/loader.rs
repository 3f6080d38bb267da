//! Loading a model from disk: its files are mapped once, its config read,
//! and the architecture built from its weights. One arm per file format.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ee_core::safetensors::directory_fingerprint;

use crate::config::LlamaConfig;
use crate::linear::LoadOptions;
use crate::model::CausalLm;
use crate::weights::gguf::GgufWeights;
use crate::weights::safetensors::SafetensorsWeights;
use crate::{models, Error};

/// A model's files, mapped and with their headers parsed.
pub enum ModelFiles {
    /// A GGUF file (quantized or float).
    Gguf(GgufWeights),
    /// A Hugging Face directory: `config.json` and safetensors weights.
    HuggingFace {
        config_path: PathBuf,
        config_bytes: Vec<u8>,
        weights: SafetensorsWeights,
    },
}

impl ModelFiles {
    /// Maps the model at `path`: a `.gguf` file, or a Hugging Face
    /// directory holding `config.json` and `model.safetensors` (or the
    /// shards of `model.safetensors.index.json`).
    pub fn open(path: &Path) -> Result<Self, Error> {
        if !path.is_dir() {
            return Ok(Self::Gguf(GgufWeights::open(path)?));
        }
        let config_path = path.join("config.json");
        let config_bytes = std::fs::read(&config_path)
            .map_err(|e| Error::Model(format!("reading {}: {e}", config_path.display())))?;
        Ok(Self::HuggingFace {
            config_path,
            config_bytes,
            weights: SafetensorsWeights::open(path)?,
        })
    }

    /// The sha256 of the model's bytes, as lowercase hex: the fingerprint a
    /// client checks the server's artifact by. Read from the same map as
    /// the weights, so the file is read from disk once.
    pub fn sha256(&self) -> String {
        match self {
            Self::Gguf(w) => w.sha256(),
            Self::HuggingFace {
                config_bytes,
                weights,
                ..
            } => {
                let name = |p: &Path| {
                    p.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
                };
                let names: Vec<(String, &[u8])> =
                    weights.files().map(|(p, b)| (name(p), b)).collect();
                directory_fingerprint(
                    std::iter::once(("config.json", config_bytes.as_slice()))
                        .chain(names.iter().map(|(n, b)| (n.as_str(), *b))),
                )
            }
        }
    }

    /// Reads the config and builds the model.
    pub fn load(&self, opts: &LoadOptions) -> Result<Arc<dyn CausalLm>, Error> {
        match self {
            Self::Gguf(w) => models::build(LlamaConfig::from_gguf(w)?, w, opts),
            Self::HuggingFace {
                config_path,
                config_bytes,
                weights,
            } => models::build(
                LlamaConfig::from_hf_config(config_path, config_bytes)?,
                weights,
                opts,
            ),
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
