//! Loading a model from disk: its files are mapped once, its config read,
//! and the architecture built from its weights. One arm per file format.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ee_core::hf_text::{
    CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE,
};
use ee_core::safetensors::{
    directory_fingerprint, file_name, CheckpointFiles, CONFIG_FILE, SERVER_CONFIG_KEYS,
};
use ee_core::tokenizer::TOKENIZER_KEY_PREFIX;
use ee_core::transform::encoder::is_encoder_config;

use crate::config::encoder::EncoderConfig;
use crate::config::LlamaConfig;
use crate::encoder::Encoder;
use crate::linear::LoadOptions;
use crate::model::CausalLm;
use crate::weights::gguf::GgufWeights;
use crate::weights::safetensors::SafetensorsWeights;
use crate::weights::WeightSource;
use crate::{models, Error};

/// A checkpoint's files that only the client may keep (a WordPiece
/// tokenizer's `vocab.txt`, and sentence-transformers' tokenizer settings,
/// among them).
const CLIENT_FILES: [&str; 8] = [
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    "special_tokens_map.json",
    "vocab.txt",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
];

/// A model's files, mapped and with their headers parsed.
pub enum ModelFiles {
    /// A GGUF file (quantized or float).
    Gguf(GgufWeights),
    /// A Hugging Face directory: `config.json` and safetensors weights.
    HuggingFace {
        config_path: PathBuf,
        config: Vec<u8>,
        /// The shard index, if any: (file name, bytes).
        index: Option<(String, Vec<u8>)>,
        /// sentence-transformers' pooling files: (relative name, bytes).
        pooling: Vec<(String, Vec<u8>)>,
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
        let files = CheckpointFiles::find(path)?;
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| Error::Model(format!("reading {}: {e}", p.display())))
        };
        Ok(Self::HuggingFace {
            config: read(&files.config)?,
            index: match &files.index {
                Some(p) => Some((file_name(p), read(p)?)),
                None => None,
            },
            pooling: files
                .pooling
                .iter()
                .map(|(n, p)| Ok((n.clone(), read(p)?)))
                .collect::<Result<_, Error>>()?,
            config_path: files.config.clone(),
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
                config,
                index,
                pooling,
                weights,
                ..
            } => {
                let shards: Vec<(String, &[u8])> =
                    weights.files().map(|(p, b)| (file_name(p), b)).collect();
                directory_fingerprint(
                    std::iter::once((CONFIG_FILE, config.as_slice()))
                        .chain(index.iter().map(|(n, b)| (n.as_str(), b.as_slice())))
                        .chain(pooling.iter().map(|(n, b)| (n.as_str(), b.as_slice())))
                        .chain(shards.iter().map(|(n, b)| (n.as_str(), *b))),
                )
            }
        }
    }

    /// What the files carry that only a client may keep: GGUF `tokenizer.*`
    /// keys; a checkpoint's tokenizer and generation files, and
    /// `config.json` keys beyond the architecture's (such as the plaintext
    /// `bos_token_id`). Empty for a server artifact that `ee encrypt-model`
    /// wrote; a plaintext model shows here.
    pub fn client_side_data(&self) -> Vec<String> {
        match self {
            Self::Gguf(w) => w
                .header()
                .metadata
                .iter()
                .map(|(k, _)| k)
                .filter(|k| k.starts_with(TOKENIZER_KEY_PREFIX))
                .cloned()
                .collect(),
            Self::HuggingFace {
                config_path,
                config,
                ..
            } => {
                let keys: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(config).unwrap_or_default();
                let mut found: Vec<String> = keys
                    .keys()
                    .filter(|k| !SERVER_CONFIG_KEYS.contains(&k.as_str()))
                    .map(|k| format!("{CONFIG_FILE}: {k}"))
                    .collect();
                let dir = config_path.parent().unwrap_or(Path::new("."));
                found.extend(
                    CLIENT_FILES
                        .iter()
                        .filter(|f| dir.join(f).exists())
                        .map(|f| (*f).to_owned()),
                );
                found
            }
        }
    }

    /// The weights, by Hugging Face tensor name (for tools that read them
    /// without building the model, such as the attack lab).
    pub fn weights(&self) -> &dyn WeightSource {
        match self {
            Self::Gguf(w) => w,
            Self::HuggingFace { weights, .. } => weights,
        }
    }

    /// Whether the files hold an encoder (BERT, DistilBERT) rather than a
    /// causal LM: [`load_encoder`](Self::load_encoder) builds it.
    pub fn is_encoder(&self) -> bool {
        match self {
            Self::Gguf(_) => false,
            Self::HuggingFace { config, .. } => {
                serde_json::from_slice(config).is_ok_and(|c| is_encoder_config(&c))
            }
        }
    }

    /// Reads the config and builds the encoder. Errors for a GGUF file
    /// (encoders load from Hugging Face checkpoints only) or a causal LM.
    pub fn load_encoder(&self) -> Result<Arc<dyn Encoder>, Error> {
        match self {
            Self::Gguf(_) => Err(Error::Unsupported(
                "encoders load from Hugging Face checkpoint directories, not GGUF".into(),
            )),
            Self::HuggingFace {
                config_path,
                config,
                weights,
                ..
            } => {
                models::build_encoder(EncoderConfig::from_hf_config(config_path, config)?, weights)
            }
        }
    }

    /// Reads the config and builds the model.
    pub fn load(&self, opts: &LoadOptions) -> Result<Arc<dyn CausalLm>, Error> {
        match self {
            Self::Gguf(w) => models::build(LlamaConfig::from_gguf(w)?, w, opts),
            Self::HuggingFace {
                config_path,
                config,
                weights,
                ..
            } => models::build(
                LlamaConfig::from_hf_config(config_path, config)?,
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
