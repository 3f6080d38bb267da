//! The EE transform: the server artifact of a model.
//!
//! Rows of the token embedding and of the output head move to their
//! encrypted positions by byte copy of whole rows, so the transformed model
//! computes exactly what the original does, on permuted IDs; everything the
//! tokenizer or chat template needs is left out. One module per file
//! format: [`gguf`] writes a `.gguf`, [`safetensors`] a Hugging Face
//! directory.

pub mod channels;
pub mod encoder;
pub mod gguf;
pub mod llama;
pub mod safetensors;

use std::fs::File;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{Error, Permutation};

pub use gguf::{
    embedding_vocab_size, gguf_hidden_plan, write_gguf_hidden_artifact, write_gguf_server_artifact,
};
pub use safetensors::{
    write_encoder_server_artifact, write_hf_hidden_artifact, write_hf_server_artifact,
};

/// Writes the server artifact of `input` under `perm` to `output`: a
/// `.gguf` for a GGUF file ([`write_gguf_server_artifact`]), a directory
/// for a Hugging Face checkpoint directory ([`write_hf_server_artifact`]).
/// `progress(done, total)` follows the tensor bytes written.
pub fn write_server_artifact(
    input: &Path,
    output: &Path,
    perm: &Permutation,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TransformReport, Error> {
    match input.is_dir() {
        true => write_hf_server_artifact(input, output, perm, progress),
        false => write_gguf_server_artifact(input, output, perm, progress),
    }
}

/// The sha256 of a file, as lowercase hex: the fingerprint of an artifact.
pub fn sha256_file(path: &Path) -> Result<String, Error> {
    let mut f =
        File::open(path).map_err(|e| Error::Io(format!("opening {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)
        .map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
    Ok(hex::encode(hasher.finalize()))
}

/// What the transform wrote.
#[derive(Debug, Clone)]
pub struct TransformReport {
    pub sha256: String,
    pub bytes: u64,
    pub vocab_size: u32,
    /// Names of the tensors whose rows were permuted.
    pub permuted_tensors: Vec<String>,
    /// What the tier could not move, for the user to read.
    pub notes: Vec<String>,
}

/// Moves whole rows of the tensor `name` (`n_rows` rows in `data`): row
/// `t` lands at row `π(t)`. Bytes are copied, never decoded, so any element
/// type or quantization moves exactly.
fn permute_rows(
    name: &str,
    data: &[u8],
    n_rows: u64,
    perm: &Permutation,
) -> Result<Vec<u8>, Error> {
    if n_rows != perm.len() as u64 || n_rows == 0 || !(data.len() as u64).is_multiple_of(n_rows) {
        return Err(Error::Permutation(format!(
            "{name} has {n_rows} rows but the vocabulary has {}",
            perm.len()
        )));
    }
    let row = data.len() / n_rows as usize;
    let mut out = vec![0u8; data.len()];
    for (plain, src) in data.chunks_exact(row).enumerate() {
        let cipher = perm
            .encrypt(plain as u32)
            .expect("row count checked against the permutation") as usize;
        out[cipher * row..(cipher + 1) * row].copy_from_slice(src);
    }
    Ok(out)
}
