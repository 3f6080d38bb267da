//! Loading a model from disk: its files are mapped once, its config read,
//! and the architecture built from its weights. One arm per file format.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ee_core::safetensors::{directory_fingerprint, CheckpointFiles};

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
        /// `config.json` and the shard index, if any: (file name, bytes).
        small_files: Vec<(String, Vec<u8>)>,
        weights: SafetensorsWeights,
    },
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

impl ModelFiles {
    /// Maps the model at `path`: a `.gguf` file, or a Hugging Face
    /// directory holding `config.json` and `model.safetensors` (or the
    /// shards of `model.safetensors.index.json`).
    pub fn open(path: &Path) -> Result<Self, Error> {
        if !path.is_dir() {
            return Ok(Self::Gguf(GgufWeights::open(path)?));
        }
        let files = CheckpointFiles::find(path)?;
        let small_files = std::iter::once(&files.config)
            .chain(&files.index)
            .map(|p| {
                std::fs::read(p)
                    .map(|b| (file_name(p), b))
                    .map_err(|e| Error::Model(format!("reading {}: {e}", p.display())))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self::HuggingFace {
            config_path: files.config.clone(),
            small_files,
            weights: SafetensorsWeights::open(&files)?,
        })
    }

    /// The model's fingerprint, as lowercase hex, which a client checks the
    /// server's artifact by: the sha256 of a GGUF file, or
    /// [`directory_fingerprint`] of a checkpoint's files. Read from the same
    /// maps as the weights, so the files are read from disk once.
    pub fn sha256(&self) -> String {
        match self {
            Self::Gguf(w) => w.sha256(),
            Self::HuggingFace {
                small_files,
                weights,
                ..
            } => {
                let shards: Vec<(String, &[u8])> =
                    weights.files().map(|(p, b)| (file_name(p), b)).collect();
                directory_fingerprint(
                    small_files
                        .iter()
                        .map(|(n, b)| (n.as_str(), b.as_slice()))
                        .chain(shards.iter().map(|(n, b)| (n.as_str(), *b))),
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
                small_files,
                weights,
            } => models::build(
                LlamaConfig::from_hf_config(config_path, &small_files[0].1)?,
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
