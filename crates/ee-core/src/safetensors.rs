//! Hugging Face checkpoints (`config.json` and safetensors files): the facts
//! about them the transform and the server's fingerprint need.

use sha2::{Digest, Sha256};

/// Tensors whose rows are indexed by token ID: the token embedding and the
/// output head (absent when tied to the embedding).
pub const VOCAB_ROW_TENSORS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// The fingerprint of a checkpoint directory, as lowercase hex: the sha256
/// of each file's name, a NUL, its length (8 bytes, little-endian) and its
/// bytes, files taken in name order. One hash over what the server loads
/// (its `config.json` and weights), as a GGUF artifact's is over its one file.
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
}
