//! `ee-lab`: the attack lab. It measures how much of an EE key an adversary
//! recovers, on our own keys, so that `SECURITY.md` states figures rather
//! than a key-space argument (see `../shared/docs/threat-model.md`).
//!
//! - [`map`]: what every attack produces, a [`RecoveredMap`] from encrypted
//!   to plaintext IDs (JSON, so anyone can score it);
//! - [`score`]: the scorer, the only part that reads the true key;
//! - [`rows`]: a model's vocabulary rows (embedding and output head), as an
//!   operator holding the weights reads them;
//! - attacks: [`weight_match`] (the server operator with the public base
//!   model), [`channel_match`] (the same operator against an encoder's
//!   hidden channels), [`nearest`] (the same operator facing private, fine-tuned
//!   weights), [`fingerprint`] (anyone who can query the server),
//!   [`frequency`] and [`search`] (a passive observer of the traffic, with
//!   the public model as its prior), [`bound`] (brute force).
//!
//! Each attack takes only what its adversary has: weights it can read, and
//! never the key.

pub mod bound;
pub mod channel_match;
pub mod fingerprint;
pub mod frequency;
pub mod map;
pub mod nearest;
pub mod prompts;
pub mod rows;
pub mod score;
pub mod search;
pub mod weight_match;

pub use map::RecoveredMap;
pub use score::Score;

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or running a model failed.
    #[error(transparent)]
    Engine(#[from] ee_engine::Error),
    /// A model or its rows are not what an attack can use.
    #[error("{0}")]
    Model(String),
    /// A mapping file could not be read or written.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
