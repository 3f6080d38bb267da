//! Hugging Face checkpoints: a directory with `config.json` and safetensors
//! weights (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`). The facts about them that the engine,
//! the transform and the artifact's fingerprint share.

use std::path::{Path, PathBuf};

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
/// the special tokens' rows.
pub const SERVER_CONFIG_KEYS: [&str; 19] = [
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
];

/// The files of a checkpoint directory.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFiles {
    pub config: PathBuf,
    /// `model.safetensors.index.json`, for a sharded checkpoint.
    pub index: Option<PathBuf>,
    /// The weight files, in name order.
    pub shards: Vec<PathBuf>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
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
        })
    }

    /// Every file, in the order the fingerprint takes them.
    pub fn all(&self) -> Vec<&Path> {
        let mut all = vec![self.config.as_path()];
        all.extend(self.index.as_deref());
        all.extend(self.shards.iter().map(PathBuf::as_path));
        all
    }
}

/// The server's `config.json`: only [`SERVER_CONFIG_KEYS`] of `config`.
pub fn server_config(config: &Map<String, Value>) -> Map<String, Value> {
    config
        .iter()
        .filter(|(k, _)| SERVER_CONFIG_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The fingerprint of a checkpoint directory, as lowercase hex: the sha256
/// of each file's name, a NUL, its length (8 bytes, little-endian) and its
/// bytes, files taken in name order. One hash over what the server loads,
/// as a GGUF artifact's is over its one file.
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
