//! Wire types of the encoder endpoints, shared by the blind server and the
//! client: OpenAI's `/v1/embeddings` and vLLM's `/classify`. To the server,
//! inputs are encrypted token IDs and results stay in the key's
//! coordinates: embeddings permuted by σ, class probabilities by λ, class
//! names absent. The proxy speaks the same shapes to its users, with text
//! inputs, plain vectors and label names.

use serde::{Deserialize, Serialize};

use super::PromptInput;

/// `POST /v1/embeddings`. `input` is one token-ID sequence or several to
/// the server; the proxy also takes a string or a list of strings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: PromptInput,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// OpenAI's Matryoshka truncation: only the model's own width is
    /// accepted.
    pub dimensions: Option<i64>,
    /// vLLM's: keep at most this many tokens of each input (`-1`: the
    /// model's limit) instead of refusing a longer one.
    pub truncate_prompt_tokens: Option<i64>,
    /// OpenAI's end-user tag: accepted, never interpreted.
    pub user: Option<String>,
}

/// One embedding: floats, or their little-endian f32 bytes in base64.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct EmbeddingData {
    pub object: String,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// Token counts of an encoder request (OpenAI's embeddings usage).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PoolingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct EmbeddingResponse {
    pub object: String,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: PoolingUsage,
}

/// `POST /classify` (vLLM's shape): `input` as for embeddings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ClassificationRequest {
    pub model: Option<String>,
    pub input: PromptInput,
    pub truncate_prompt_tokens: Option<i64>,
    pub user: Option<String>,
}

/// One input's classes. From the server, `label` is `None` and `probs` is
/// in the key's class order; the proxy names the label and reorders.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ClassificationData {
    pub index: usize,
    pub label: Option<String>,
    pub probs: Vec<f32>,
    pub num_classes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ClassificationResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<ClassificationData>,
    pub usage: PoolingUsage,
}
