//! The client bundle: everything the key holder needs, in one directory.
//!
//! ```text
//! bundle/
//!   bundle.json     manifest: template, special-token IDs, server fingerprint
//!   key.json        the secret key (mode 0600)
//!   tokenizer.json  Hugging Face tokenizer built from the GGUF metadata
//! ```
//!
//! Token IDs in the bundle are plaintext: the bundle never leaves the client.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::key::write_private_atomically;
use crate::tokenizer::GgufVocab;
use crate::{Error, Key};

pub const BUNDLE_FORMAT: &str = "ee-bundle/1";
pub const MANIFEST_FILE: &str = "bundle.json";
pub const KEY_FILE: &str = "key.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The fingerprint of the server artifact the bundle was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactFingerprint {
    pub sha256: String,
    pub bytes: u64,
}

/// Special tokens, by plaintext ID, with their text for chat templates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialTokens {
    pub bos_id: Option<u32>,
    pub bos: Option<String>,
    pub eos_id: Option<u32>,
    pub eos: Option<String>,
    pub pad_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Tokens that end a turn: EOS plus the chat template's end-of-turn marker.
    pub stop_ids: Vec<u32>,
}

/// End-of-turn markers that stop generation when a vocabulary has them as
/// control tokens (ChatML, Llama 3's two, Phi-3, Gemma, and SentencePiece's
/// `</s>`, which Mistral's templates close turns with).
pub const END_OF_TURN_MARKERS: [&str; 6] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
];

/// `bundle.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleManifest {
    pub format: String,
    pub model_name: Option<String>,
    pub architecture: String,
    pub vocab_size: u32,
    pub context_length: Option<u64>,
    pub server_artifact: ArtifactFingerprint,
    /// Public fingerprint of the key, to spot a key swapped under a bundle.
    pub key_fingerprint: String,
    /// Whether the key is the insecure identity key (plaintext baseline).
    pub identity_key: bool,
    pub chat_template: Option<String>,
    pub special_tokens: SpecialTokens,
    /// What the key hides: the vocabulary only (logits bit-exact), or the
    /// hidden channels too (exact up to float summation order).
    #[serde(default)]
    pub tier: Tier,
    /// What the client needs of an encoder (BERT-family) model; absent for
    /// a causal LM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<EncoderFacts>,
}

/// How much of a model a key hides (`ee encrypt-model --tier`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The vocabulary permutation π only: rows of the embedding and output
    /// head move, and encrypted logits are bit-identical, permuted.
    #[default]
    Vocab,
    /// π plus hidden-channel permutations (residual σ, FFN τₗ, heads ηₗ):
    /// the same function, summed in another order, so logits agree to
    /// float rounding. Encoders always use it.
    Hidden,
}

/// An encoder's facts the key holder needs: the width of its embeddings
/// (σ's size) and its class names in plaintext class order, which the
/// server never holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncoderFacts {
    pub hidden_size: u32,
    /// A classifier's class names by class index (`id2label`, or
    /// transformers' `LABEL_i`); absent for a model without a
    /// classification head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

impl SpecialTokens {
    /// Reads special tokens from the GGUF vocabulary. The end-of-turn marker
    /// of ChatML-style templates counts as a stop token alongside EOS.
    pub fn from_vocab(v: &GgufVocab) -> Self {
        let mut stop_ids: Vec<u32> = v.eos_token_id.into_iter().collect();
        for marker in END_OF_TURN_MARKERS {
            if let Some(id) = v.tokens.iter().position(|t| t == marker) {
                let id = id as u32;
                if v.control_token_ids().contains(&id) && !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        Self {
            bos_id: v.bos_token_id,
            bos: v.token(v.bos_token_id).map(str::to_owned),
            eos_id: v.eos_token_id,
            eos: v.token(v.eos_token_id).map(str::to_owned),
            pad_id: v.pad_token_id,
            add_bos: v.add_bos_token,
            add_eos: v.add_eos_token,
            stop_ids,
        }
    }
}

/// A loaded bundle.
#[derive(Debug, Clone)]
pub struct ClientBundle {
    pub dir: PathBuf,
    pub manifest: BundleManifest,
    pub key: Key,
}

impl ClientBundle {
    /// Writes a bundle directory: the key (0600), the tokenizer and the manifest.
    pub fn write(
        dir: &Path,
        manifest: &BundleManifest,
        key: &Key,
        tokenizer_json: &serde_json::Value,
    ) -> Result<(), Error> {
        let io = |e: std::io::Error| Error::Io(format!("writing bundle {}: {e}", dir.display()));
        fs::create_dir_all(dir).map_err(io)?;
        key.save(&dir.join(KEY_FILE))?;
        let tok = serde_json::to_vec(tokenizer_json).map_err(|e| Error::Bundle(e.to_string()))?;
        write_private_atomically(&dir.join(TOKENIZER_FILE), &tok)?;
        let man = serde_json::to_vec_pretty(manifest).map_err(|e| Error::Bundle(e.to_string()))?;
        write_private_atomically(&dir.join(MANIFEST_FILE), &man)?;
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<Self, Error> {
        let path = dir.join(MANIFEST_FILE);
        let text =
            fs::read(&path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
        let manifest: BundleManifest = serde_json::from_slice(&text)
            .map_err(|e| Error::Bundle(format!("{}: {e}", path.display())))?;
        if manifest.format != BUNDLE_FORMAT {
            return Err(Error::Bundle(format!(
                "{}: unknown bundle format {:?}",
                path.display(),
                manifest.format
            )));
        }
        let key = Key::load(&dir.join(KEY_FILE))?;
        if key.fingerprint() != manifest.key_fingerprint {
            return Err(Error::Bundle(format!(
                "{}: the key does not match the manifest",
                dir.display()
            )));
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            key,
        })
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER_FILE)
    }

    /// Refuses a server whose artifact is not the one this bundle's key made.
    pub fn check_server_artifact(&self, sha256: &str) -> Result<(), Error> {
        if !sha256.eq_ignore_ascii_case(&self.manifest.server_artifact.sha256) {
            return Err(Error::Bundle(format!(
                "server artifact mismatch: the server hosts {sha256}, this bundle was made for {}",
                self.manifest.server_artifact.sha256
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(key: &Key) -> BundleManifest {
        BundleManifest {
            format: BUNDLE_FORMAT.into(),
            model_name: Some("tiny".into()),
            architecture: "llama".into(),
            vocab_size: 8,
            context_length: Some(64),
            server_artifact: ArtifactFingerprint {
                sha256: "ab".repeat(32),
                bytes: 10,
            },
            key_fingerprint: key.fingerprint(),
            identity_key: false,
            chat_template: None,
            special_tokens: SpecialTokens::default(),
            tier: Tier::Vocab,
            encoder: None,
        }
    }

    #[test]
    fn bundle_round_trips_and_checks_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate().unwrap();
        ClientBundle::write(
            dir.path(),
            &manifest(&key),
            &key,
            &serde_json::json!({"x": 1}),
        )
        .unwrap();
        let b = ClientBundle::load(dir.path()).unwrap();
        assert_eq!(b.key, key);
        assert!(b.check_server_artifact(&"AB".repeat(32)).is_ok());
        assert!(b.check_server_artifact(&"cd".repeat(32)).is_err());
    }

    #[test]
    fn a_swapped_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate().unwrap();
        ClientBundle::write(dir.path(), &manifest(&key), &key, &serde_json::json!({})).unwrap();
        Key::generate()
            .unwrap()
            .save(&dir.path().join(KEY_FILE))
            .unwrap();
        assert!(ClientBundle::load(dir.path()).is_err());
    }
}
