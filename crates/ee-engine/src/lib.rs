//! `ee-engine`: runs Llama-family models, plaintext or EE-transformed alike.
//!
//! A model is three things kept apart, as in candle and mistral.rs:
//! - **what it is**: an architecture behind [`CausalLm`], one file each
//!   under [`models`], with a batched forward pass in which every sequence
//!   has its own [`KvCache`] and position (for continuous batching); or an
//!   encoder (BERT, DistilBERT) behind [`Encoder`], for embeddings and
//!   classification;
//! - **where its weights come from**: a [`weights::WeightSource`] per file
//!   format (GGUF, Hugging Face safetensors), memory-mapped;
//! - **its config**: [`LlamaConfig`], from GGUF metadata or `config.json`;
//!   [`EncoderConfig`], from `config.json` and sentence-transformers' pooling.
//!
//! [`loader`] puts them together. On top of any model:
//! - [`Sampler`]: permutation-equivariant sampling;
//! - [`Scheduler`]: continuous batching on an engine thread, with prompt
//!   caching across requests ([`prefix_cache`]);
//! - [`EncodeQueue`]: packed batches of encoder requests on an engine thread;
//! - [`generate()`]: a single-sequence loop for the CLI, benchmarks and tests;
//! - [`quantize`]: GGUF requantization, `llama-quantize`'s role.
//!
//! It knows nothing of HTTP, tokenizers or keys.

pub mod activation;
pub mod allocator;
mod attention;
pub mod config;
mod embedding;
pub mod encode_queue;
pub mod encoder;
pub mod float;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod loader;
pub mod model;
pub mod models;
pub mod norm;
pub mod prefix_cache;
pub mod quant;
pub mod quantize;
pub mod sampler;
pub mod scheduler;
#[doc(hidden)]
pub mod testing;
pub mod weights;

pub use config::encoder::EncoderConfig;
pub use config::LlamaConfig;
pub use encode_queue::{EncodeQueue, EncodeQueueConfig, PoolingTask};
pub use encoder::{Encoder, Pooling, PoolingMode};
pub use generate::{generate, FinishReason, GenerateOptions, Generation};
pub use kv_cache::{KvCache, KvCacheDtype};
pub use linear::LoadOptions;
pub use loader::{load, load_with, ModelFiles};
pub use model::{CausalLm, SeqStep, StepCost};
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
    #[error(
        "the sequence may fill {needed} positions of KV cache (prompt and max_tokens), more \
         than the whole KV pool holds ({pool}); lower max_tokens or enlarge the pool"
    )]
    KvPoolExceeded { needed: usize, pool: usize },
    #[error("token ID {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("invalid sampling parameters: {0}")]
    InvalidSampling(String),
    #[error(transparent)]
    Core(#[from] ee_core::Error),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}
