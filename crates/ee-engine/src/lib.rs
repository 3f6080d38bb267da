//! `ee-engine`: runs Llama-family GGUF models, plaintext or EE-transformed
//! alike.
//!
//! - [`LlamaModel`]: loading and a batched forward pass in which every
//!   sequence has its own [`KvCache`] and position (for continuous batching);
//! - [`Sampler`]: permutation-equivariant sampling;
//! - [`Scheduler`]: continuous batching on an engine thread;
//! - [`generate()`]: a single-sequence loop for the CLI, benchmarks and tests.
//!
//! It knows nothing of HTTP, tokenizers or keys.

pub mod config;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod quant;
pub mod sampler;
pub mod scheduler;
#[doc(hidden)]
pub mod testing;

pub use config::LlamaConfig;
pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use kv_cache::KvCache;
pub use llama::{LlamaModel, LoadOptions, SeqStep};
pub use sampler::{Sampled, Sampler, SamplingParams, TokenLogprobs};
pub use scheduler::{Scheduler, SchedulerConfig, SequenceEvent, SequenceRequest, SubmitError};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model error: {0}")]
    Model(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("context length exceeded: {needed} tokens needed, the model's limit is {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("token ID {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    #[error(transparent)]
    Core(#[from] ee_core::Error),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}
