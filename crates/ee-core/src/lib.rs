//! `ee-core`: the pure heart of Equivariant Encryption (EE).
//!
//! - [`Key`] and the [`Permutation`]s derived from it;
//! - a module per model file format: [`gguf`] (a streaming reader/writer,
//!   tensor names) and [`safetensors`] (Hugging Face checkpoints), with
//!   [`sentence_transformers`]' pooling files beside them;
//! - [`transform`], which writes the server artifact (vocabulary rows
//!   permuted, tokenizer gone);
//! - [`tokenizer`]: the tokenizer metadata of a GGUF, which only the client
//!   may keep, and its Hugging Face `tokenizer.json` form, one module per
//!   tokenizer kind; [`hf_text`]: the
//!   tokenizer files of a Hugging Face checkpoint;
//! - [`bundle`]: the client bundle format;
//! - [`wire`]: the request/response types server and client share.
//!
//! No networking and no inference live here; the only I/O is reading and
//! writing model, key and bundle files.

pub mod bundle;
pub mod gguf;
pub mod hf_text;
pub mod key;
pub mod perm;
pub mod rng;
pub mod safetensors;
pub mod sentence_transformers;
pub mod tokenizer;
pub mod transform;
pub mod wire;

pub use bundle::{BundleManifest, ClientBundle};
pub use key::Key;
pub use perm::Permutation;

/// Errors of the core crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("invalid GGUF: {0}")]
    Gguf(String),
    #[error("key error: {0}")]
    Key(String),
    #[error("permutation error: {0}")]
    Permutation(String),
    #[error("token ID {0} is outside the vocabulary of {1}")]
    TokenOutOfRange(u32, usize),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("client bundle error: {0}")]
    Bundle(String),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}
