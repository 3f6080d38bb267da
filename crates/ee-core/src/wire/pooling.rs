//! Wire types of the encoder endpoints, shared by the blind server and the
//! client: OpenAI's `/v1/embeddings` and vLLM's `/classify`. To the server,
//! inputs are encrypted token IDs and results stay in the key's
//! coordinates: embeddings permuted by σ, class probabilities by λ, class
//! names absent. The proxy speaks the same shapes to its users, with text
//! inputs, plain vectors and label names.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::PromptInput;

/// OpenAI's limit on inputs per embeddings request.
pub const MAX_INPUTS: usize = 2048;

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
    /// Keep at most this many tokens of each input (`-1`: the model's
    /// limit) instead of refusing a longer one (named after vLLM's).
    pub truncate_prompt_tokens: Option<i64>,
    /// OpenAI's end-user tag: accepted, never interpreted.
    pub user: Option<String>,
    /// Fields the API does not define: refused by name.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, Value>,
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
    /// Fields the API does not define: refused by name.
    #[serde(flatten, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, Value>,
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

/// A refused field of an encoder request: the parameter, why, and OpenAI's
/// `code` where there is one. The server and the proxy check the same
/// fields with the same rules, here.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub param: String,
    pub message: String,
    pub code: Option<&'static str>,
}

fn refuse(param: &str, message: String) -> FieldError {
    FieldError {
        param: param.to_owned(),
        message,
        code: None,
    }
}

/// Refuses the first field the API does not define.
pub fn check_unknown(unknown: &BTreeMap<String, Value>) -> Result<(), FieldError> {
    match unknown.keys().next() {
        Some(name) => Err(refuse(name, format!("unsupported parameter: {name}"))),
        None => Ok(()),
    }
}

/// Whether `encoding_format` asks for base64 (else floats).
pub fn wants_base64(encoding_format: Option<&str>) -> Result<bool, FieldError> {
    match encoding_format {
        None | Some("float") => Ok(false),
        Some("base64") => Ok(true),
        Some(other) => Err(refuse(
            "encoding_format",
            format!("encoding_format {other:?}: use \"float\" or \"base64\""),
        )),
    }
}

/// `dimensions`: absent, or the model's own width `hidden`.
pub fn check_dimensions(dimensions: Option<i64>, hidden: usize) -> Result<(), FieldError> {
    match dimensions {
        Some(d) if d != hidden as i64 => Err(refuse(
            "dimensions",
            format!(
                "dimensions {d}: this model's embeddings have {hidden} dimensions and it was \
                 not trained to be shortened (Matryoshka); leave dimensions out"
            ),
        )),
        _ => Ok(()),
    }
}

/// `truncate_prompt_tokens` as a token count: `-1` is the model's limit
/// `max`, `1..=max` itself, absent none.
pub fn truncation(k: Option<i64>, max: usize) -> Result<Option<usize>, FieldError> {
    match k {
        None => Ok(None),
        Some(-1) => Ok(Some(max)),
        Some(k) if k >= 1 && k as u64 <= max as u64 => Ok(Some(k as usize)),
        Some(k) => Err(refuse(
            "truncate_prompt_tokens",
            format!("truncate_prompt_tokens is {k}; use -1 (the model's {max}) or 1 to {max}"),
        )),
    }
}

/// The number of inputs: 1 to [`MAX_INPUTS`].
pub fn check_input_count(n: usize) -> Result<(), FieldError> {
    match n {
        0 => Err(refuse("input", "input is empty".into())),
        n if n > MAX_INPUTS => Err(refuse(
            "input",
            format!("input holds {n} items; send 1 to {MAX_INPUTS}"),
        )),
        _ => Ok(()),
    }
}

/// An input longer than the model's `max` positions, without truncation.
pub fn too_long(index: usize, max: usize) -> FieldError {
    FieldError {
        code: Some(super::CONTEXT_LENGTH_EXCEEDED),
        ..refuse(
            "input",
            format!(
                "input[{index}] holds more than {max} tokens, this model's maximum; shorten it, \
                 or set truncate_prompt_tokens to cut it"
            ),
        )
    }
}

/// An embedding as OpenAI's `base64`: its little-endian f32 bytes.
pub fn base64_floats(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_checked_by_one_rule_each() {
        assert_eq!(wants_base64(Some("base64")), Ok(true));
        assert_eq!(wants_base64(None), Ok(false));
        assert_eq!(
            wants_base64(Some("hex")).unwrap_err().param,
            "encoding_format"
        );
        assert!(check_dimensions(Some(384), 384).is_ok() && check_dimensions(None, 384).is_ok());
        assert_eq!(
            check_dimensions(Some(10), 384).unwrap_err().param,
            "dimensions"
        );
        assert_eq!(truncation(Some(-1), 8), Ok(Some(8)));
        assert_eq!(truncation(Some(3), 8), Ok(Some(3)));
        for bad in [0, 9, -2] {
            assert_eq!(
                truncation(Some(bad), 8).unwrap_err().param,
                "truncate_prompt_tokens"
            );
        }
        assert!(check_input_count(0).is_err() && check_input_count(MAX_INPUTS + 1).is_err());
        assert_eq!(too_long(2, 8).code, Some("context_length_exceeded"));
        // 1.0f32 is 00 00 80 3f.
        assert_eq!(base64_floats(&[1.0]), "AACAPw==");
        let r: EmbeddingRequest =
            serde_json::from_value(serde_json::json!({"input": "x", "stream": true})).unwrap();
        assert_eq!(check_unknown(&r.unknown).unwrap_err().param, "stream");
    }
}
