//! Hugging Face checkpoints: a directory with `config.json` and safetensors
//! weights (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`). The facts about them that the engine,
//! the transform and the artifact's fingerprint share.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::SafeTensors;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::Error;

/// Tensors whose rows are indexed by token ID: the token embedding and the
/// output head (absent when tied to the embedding).
pub const VOCAB_ROW_TENSORS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

pub const CONFIG_FILE: &str = "config.json";
/// The single-file checkpoint's weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The `config.json` keys a server artifact keeps: what the forward pass
/// needs. Everything else is dropped, among it `bos_token_id`,
/// `eos_token_id` and `pad_token_id`, plaintext IDs that would point at
/// the special tokens' rows, and a classifier's label names (`id2label`),
/// of which only the count (`num_labels`) stays. Llama/Mistral's keys come
/// first, then BERT's and DistilBERT's.
pub const SERVER_CONFIG_KEYS: [&str; 30] = [
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "sliding_window",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "torch_dtype",
    "type_vocab_size",
    "layer_norm_eps",
    "position_embedding_type",
    "num_labels",
    "problem_type",
    "dim",
    "n_layers",
    "n_heads",
    "hidden_dim",
    "activation",
    "sinusoidal_pos_embds",
];

/// The files of a checkpoint directory.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFiles {
    pub config: PathBuf,
    /// `model.safetensors.index.json`, for a sharded checkpoint.
    pub index: Option<PathBuf>,
    /// The weight files, in name order.
    pub shards: Vec<PathBuf>,
    /// A sentence-transformers model's `modules.json` and the config of
    /// its `Pooling` module, by path relative to the directory
    /// (`1_Pooling/config.json`): how its embeddings are pooled, which the
    /// server needs and an artifact keeps.
    pub pooling: Vec<(String, PathBuf)>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// The pooling files of the model in `dir` (none without `modules.json`).
fn pooling_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, Error> {
    Ok(crate::sentence_transformers::read_modules(dir)?.map_or_else(Vec::new, |m| m.files))
}

impl CheckpointFiles {
    /// Finds the files of the checkpoint in `dir`.
    ///
    /// Errors name the file: no `config.json`, neither weights file, an
    /// index that does not parse, or a shard it lists that is missing.
    pub fn find(dir: &Path) -> Result<Self, Error> {
        let config = dir.join(CONFIG_FILE);
        if !config.is_file() {
            return Err(Error::Io(format!("{} is missing", config.display())));
        }
        let index = dir.join(INDEX_FILE);
        if !index.exists() {
            let single = dir.join(SINGLE_FILE);
            if !single.is_file() {
                return Err(Error::Io(format!(
                    "{} has neither {SINGLE_FILE} nor {INDEX_FILE}",
                    dir.display()
                )));
            }
            return Ok(Self {
                config,
                index: None,
                shards: vec![single],
                pooling: pooling_files(dir)?,
            });
        }
        let text = std::fs::read(&index)
            .map_err(|e| Error::Io(format!("reading {}: {e}", index.display())))?;
        let listed: ShardIndex = serde_json::from_slice(&text)
            .map_err(|e| Error::Io(format!("{}: {e}", index.display())))?;
        let mut shards: Vec<PathBuf> = Vec::new();
        for file in listed.weight_map.values() {
            let path = dir.join(file);
            let plain_name = Path::new(file)
                .file_name()
                .is_some_and(|n| n == file.as_str());
            if !plain_name || !path.is_file() {
                return Err(Error::Io(format!(
                    "{}: shard {file:?} is missing from {}",
                    index.display(),
                    dir.display()
                )));
            }
            shards.push(path);
        }
        shards.sort();
        shards.dedup();
        Ok(Self {
            config,
            index: Some(index),
            shards,
            pooling: pooling_files(dir)?,
        })
    }

    /// Every file the server loads, by the name its fingerprint gives it:
    /// config, index if any, shards, pooling files.
    pub fn named(&self) -> Vec<(String, &Path)> {
        let mut named: Vec<(String, &Path)> =
            self.all().into_iter().map(|p| (file_name(p), p)).collect();
        named.extend(self.pooling.iter().map(|(n, p)| (n.clone(), p.as_path())));
        named
    }

    /// Config, index if any, shards.
    pub fn all(&self) -> Vec<&Path> {
        let mut all = vec![self.config.as_path()];
        all.extend(self.index.as_deref());
        all.extend(self.shards.iter().map(PathBuf::as_path));
        all
    }
}

/// Reads a checkpoint's `config.json` as a JSON object.
pub fn read_config(path: &Path) -> Result<Map<String, Value>, Error> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Io(format!("{}: {e}", path.display())))
}

/// `vocab_size` of a checkpoint's `config.json` (read from `path`): the
/// rows the key covers.
pub fn config_vocab_size(config: &Map<String, Value>, path: &Path) -> Result<u32, Error> {
    config
        .get("vocab_size")
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v > 0)
        .ok_or_else(|| Error::Io(format!("{}: no valid vocab_size", path.display())))
}

/// A file's name, for fingerprints and for writing beside it.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// One `.safetensors` file, memory-mapped, its header parsed and checked:
/// the tensors tile the data exactly (safetensors' `read_metadata`).
pub struct MappedFile {
    pub path: PathBuf,
    pub map: Mmap,
    /// Where tensor data starts: after the 8-byte length and the header.
    pub data_start: usize,
    pub metadata: Metadata,
}

/// Maps a file read-only.
pub fn map_file(path: &Path) -> Result<Mmap, Error> {
    let file =
        File::open(path).map_err(|e| Error::Io(format!("opening {}: {e}", path.display())))?;
    // SAFETY: read-only. A model file changed while it is in use is outside
    // what we guard against; llama.cpp and candle map model files the same
    // way.
    unsafe { Mmap::map(&file) }.map_err(|e| Error::Io(format!("mapping {}: {e}", path.display())))
}

impl MappedFile {
    /// Errors name the file: unreadable, truncated or corrupt.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let map = map_file(path)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::Io(format!(
                "{}: not a valid safetensors file: {e:?}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_owned(),
            data_start: 8 + header_len,
            map,
            metadata,
        })
    }

    /// Tensors in data order: (name, info, bytes).
    pub fn tensors(&self) -> Vec<(String, &TensorInfo, &[u8])> {
        let mut tensors: Vec<(String, &TensorInfo)> = self.metadata.tensors().into_iter().collect();
        tensors.sort_by_key(|(_, info)| info.data_offsets.0);
        tensors
            .into_iter()
            .map(|(name, info)| {
                let (start, end) = info.data_offsets;
                let bytes = &self.map[self.data_start + start..self.data_start + end];
                (name, info, bytes)
            })
            .collect()
    }

    /// This file's header without its free-form `__metadata__` map (which
    /// converters may fill with anything), with its length prefix and the
    /// spaces that pad it to 8 bytes. Data offsets are relative to the end
    /// of the header, so the data that follows is unchanged.
    pub fn header_without_metadata(&self) -> Result<Vec<u8>, Error> {
        let tensors: Map<String, Value> = self
            .metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| Ok((name, serde_json::to_value(info)?)))
            .collect::<Result<_, serde_json::Error>>()
            .map_err(|e| Error::Io(format!("{}: {e}", self.path.display())))?;
        let mut json = serde_json::to_vec(&tensors).map_err(|e| Error::Io(e.to_string()))?;
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        Ok(out)
    }
}

/// The server's `config.json`: only [`SERVER_CONFIG_KEYS`] of `config`,
/// with a classifier's `id2label` replaced by its size, `num_labels`.
pub fn server_config(config: &Map<String, Value>) -> Map<String, Value> {
    let mut kept: Map<String, Value> = config
        .iter()
        .filter(|(k, _)| SERVER_CONFIG_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(labels) = config.get("id2label").and_then(Value::as_object) {
        kept.insert("num_labels".into(), labels.len().into());
    }
    kept
}

/// The fingerprint of a checkpoint directory, as lowercase hex: the sha256
/// of each file's name, a NUL, its length (8 bytes, little-endian) and its
/// bytes, files taken in byte order of their names. One hash over what the
/// server loads (`config.json`, the index if any, the shards), as a GGUF
/// artifact's is over its one file.
pub fn directory_fingerprint<'a>(files: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut files: Vec<_> = files.into_iter().collect();
    files.sort_by_key(|(name, _)| *name);
    let mut hasher = Sha256::new();
    for (name, bytes) in files {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_covers_names_contents_and_boundaries_but_not_order() {
        let a = directory_fingerprint([("config.json", &b"{}"[..]), ("model.safetensors", b"xy")]);
        let b = directory_fingerprint([("model.safetensors", &b"xy"[..]), ("config.json", b"{}")]);
        assert_eq!(a, b);
        for other in [
            directory_fingerprint([("config.json", &b"{}x"[..]), ("model.safetensors", b"y")]),
            directory_fingerprint([("config.json", &b"{}"[..]), ("model.safetensors", b"xz")]),
            directory_fingerprint([("c.json", &b"{}"[..]), ("model.safetensors", b"xy")]),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn the_server_config_keeps_the_architecture_and_drops_token_ids() {
        let config: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "bos_token_id": 1,
            "eos_token_id": [2, 3], "pad_token_id": 0, "tokenizer_class": "LlamaTokenizer",
            "rope_scaling": null}))
        .unwrap();
        let kept = server_config(&config);
        let keys: Vec<&str> = kept.keys().map(String::as_str).collect();
        assert_eq!(keys, ["architectures", "hidden_size", "rope_scaling"]);
        let config: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "architectures": ["BertForSequenceClassification"], "id2label": {"0": "NEG", "1": "POS"},
            "label2id": {"NEG": 0, "POS": 1}, "pad_token_id": 0}))
        .unwrap();
        let kept = Value::Object(server_config(&config));
        assert_eq!(
            kept,
            serde_json::json!({"architectures": ["BertForSequenceClassification"], "num_labels": 2})
        );
    }

    #[test]
    fn checkpoint_files_are_found_and_a_missing_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = CheckpointFiles::find(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::write(dir.path().join(CONFIG_FILE), "{}").unwrap();
        assert!(CheckpointFiles::find(dir.path())
            .unwrap_err()
            .to_string()
            .contains(SINGLE_FILE));
        let index = r#"{"weight_map": {"a": "s-2.safetensors", "b": "s-1.safetensors", "c": "s-2.safetensors"}}"#;
        std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        std::fs::write(dir.path().join("s-1.safetensors"), "").unwrap();
        let err = CheckpointFiles::find(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("s-2.safetensors") && err.contains("missing"),
            "{err}"
        );
        std::fs::write(dir.path().join("s-2.safetensors"), "").unwrap();
        let files = CheckpointFiles::find(dir.path()).unwrap();
        let names: Vec<String> = files
            .all()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "config.json",
                INDEX_FILE,
                "s-1.safetensors",
                "s-2.safetensors"
            ]
        );
    }
}
