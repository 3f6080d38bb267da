//! The encoder endpoints: `POST /v1/embeddings` (OpenAI's shape) and
//! `POST /classify` (vLLM's), on encrypted token IDs. Embeddings leave
//! in the key's hidden coordinates (permuted by σ) and class
//! probabilities in its class order (permuted by λ), unnamed: the server
//! holds neither the vector in the user's coordinates nor the labels.
//!
//! Each request is validated here, every limit in one place, then queued
//! on the engine's [`EncodeQueue`](ee_engine::EncodeQueue).

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ee_api::{read_json, response_id, unix_now, ApiError};
use ee_core::wire::pooling::{
    base64_floats, check_dimensions, check_input_count, check_unknown, too_long, truncation,
    wants_base64, ClassificationData, ClassificationRequest, ClassificationResponse, EmbeddingData,
    EmbeddingRequest, EmbeddingResponse, EmbeddingVector, FieldError, PoolingUsage,
};
use ee_core::wire::PromptInput;
use ee_engine::scheduler::SubmitError;
use ee_engine::PoolingTask;

use crate::routes::check_model;
use crate::SharedState;

/// What an encoder's requests may ask.
#[derive(Debug, Clone)]
pub struct PoolingLimits {
    pub vocab_size: usize,
    /// The longest input, in tokens.
    pub max_positions: usize,
    /// The embeddings' width.
    pub hidden_size: usize,
    /// Classes of the classification head, if the model has one.
    pub num_labels: Option<usize>,
}

/// A validated encoder request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPooling {
    pub inputs: Vec<Vec<u32>>,
    pub base64: bool,
}

fn api(e: FieldError) -> ApiError {
    let error = ApiError::invalid(&e.param, e.message);
    match e.code {
        Some(code) => error.with_code(code),
        None => error,
    }
}

/// Checks `input` and `truncate_prompt_tokens`: one or more non-empty
/// sequences of IDs inside the vocabulary, each within the model's
/// positions, or cut to its first `truncate_prompt_tokens` when the
/// request asks (the server cannot tell `[SEP]` from any other ID; the
/// proxy cuts text itself, keeping it).
fn inputs(
    input: &PromptInput,
    truncate: Option<i64>,
    limits: &PoolingLimits,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let mut inputs = match input {
        PromptInput::Tokens(ids) if ids.is_empty() => Vec::new(),
        PromptInput::Tokens(ids) => vec![ids.clone()],
        PromptInput::Batch(batch) => batch.clone(),
        PromptInput::Text(_) => {
            return Err(ApiError::invalid(
                "input",
                "the blind server takes encrypted token IDs only (it has no tokenizer): an \
                 array of IDs or an array of such arrays; send text through the key holder's \
                 proxy",
            ))
        }
    };
    check_input_count(inputs.len()).map_err(api)?;
    let max = limits.max_positions;
    let keep = truncation(truncate, max).map_err(api)?;
    for (i, ids) in inputs.iter_mut().enumerate() {
        if ids.is_empty() {
            return Err(ApiError::invalid("input", format!("input[{i}] is empty")));
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input[{i}] holds token ID {t}, outside the vocabulary of {}",
                    limits.vocab_size
                ),
            ));
        }
        match keep {
            Some(k) => ids.truncate(k),
            None if ids.len() > max => return Err(api(too_long(i, max))),
            None => {}
        }
    }
    Ok(inputs)
}

/// Validates a `/v1/embeddings` request.
pub fn embedding(r: &EmbeddingRequest, limits: &PoolingLimits) -> Result<ValidPooling, ApiError> {
    check_unknown(&r.unknown).map_err(api)?;
    let base64 = wants_base64(r.encoding_format.as_deref()).map_err(api)?;
    check_dimensions(r.dimensions, limits.hidden_size).map_err(api)?;
    Ok(ValidPooling {
        inputs: inputs(&r.input, r.truncate_prompt_tokens, limits)?,
        base64,
    })
}

/// Validates a `/classify` request.
pub fn classification(
    r: &ClassificationRequest,
    limits: &PoolingLimits,
) -> Result<ValidPooling, ApiError> {
    check_unknown(&r.unknown).map_err(api)?;
    if limits.num_labels.is_none() {
        return Err(ApiError::bad_request(
            "this encoder has no classification head; it serves /v1/embeddings",
        )
        .with_code("model_not_supported"));
    }
    Ok(ValidPooling {
        inputs: inputs(&r.input, r.truncate_prompt_tokens, limits)?,
        base64: false,
    })
}

/// Runs validated inputs on the encoder.
async fn run(
    state: &SharedState,
    v: &ValidPooling,
    task: PoolingTask,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let (queue, _) = state.loaded()?.encoder()?;
    let rx = queue.submit(v.inputs.clone(), task).map_err(|e| match e {
        SubmitError::QueueFull(_) => ApiError::overloaded(),
        SubmitError::Stopped => ApiError::internal("the engine has stopped"),
    })?;
    let vectors = rx
        .await
        .map_err(|_| ApiError::internal("the engine has stopped"))?
        .map_err(|e| ApiError::internal(format!("the encoder failed: {e}")))?;
    let tokens: usize = v.inputs.iter().map(Vec::len).sum();
    state
        .metrics
        .prompt_tokens
        .fetch_add(tokens as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(vectors)
}

fn usage(v: &ValidPooling) -> PoolingUsage {
    let tokens = v.inputs.iter().map(Vec::len).sum();
    PoolingUsage {
        prompt_tokens: tokens,
        total_tokens: tokens,
    }
}

fn embedding_model(r: &EmbeddingRequest) -> Option<&str> {
    r.model.as_deref()
}

fn classification_model(r: &ClassificationRequest) -> Option<&str> {
    r.model.as_deref()
}

/// Reads a request, checks the model it names and validates it.
async fn accept<R: serde::de::DeserializeOwned>(
    state: &SharedState,
    headers: HeaderMap,
    body: Body,
    model: fn(&R) -> Option<&str>,
    validate: fn(&R, &PoolingLimits) -> Result<ValidPooling, ApiError>,
) -> Result<(&crate::LoadedModel, ValidPooling), ApiError> {
    let c = &state.config;
    let r: R = read_json(&headers, body, c.max_body_bytes, c.max_json_depth).await?;
    let loaded = state.loaded()?;
    check_model(loaded, model(&r))?;
    let (_, limits) = loaded.encoder()?;
    Ok((loaded, validate(&r, limits)?))
}

pub async fn embeddings(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (loaded, v) = accept(&state, headers, body, embedding_model, embedding).await?;
        let vectors = run(&state, &v, PoolingTask::Embed).await?;
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, e)| EmbeddingData {
                object: "embedding".into(),
                index,
                embedding: match v.base64 {
                    true => EmbeddingVector::Base64(base64_floats(&e)),
                    false => EmbeddingVector::Float(e),
                },
            })
            .collect();
        Ok::<_, ApiError>(Json(EmbeddingResponse {
            object: "list".into(),
            data,
            model: loaded.name.clone(),
            usage: usage(&v),
        }))
    };
    result.await.into_response()
}

pub async fn classify(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let (loaded, v) =
            accept(&state, headers, body, classification_model, classification).await?;
        let probs = run(&state, &v, PoolingTask::Classify).await?;
        let data = probs
            .into_iter()
            .enumerate()
            .map(|(index, probs)| ClassificationData {
                index,
                label: None,
                num_classes: probs.len(),
                probs,
            })
            .collect();
        Ok::<_, ApiError>(Json(ClassificationResponse {
            id: response_id("classify"),
            object: "list".into(),
            created: unix_now(),
            model: loaded.name.clone(),
            data,
            usage: usage(&v),
        }))
    };
    result.await.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PoolingLimits {
        PoolingLimits {
            vocab_size: 100,
            max_positions: 8,
            hidden_size: 16,
            num_labels: None,
        }
    }

    fn request(input: serde_json::Value, extra: serde_json::Value) -> EmbeddingRequest {
        let mut r = serde_json::json!({"input": input});
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(r).unwrap()
    }

    #[test]
    fn each_bad_field_is_named() {
        let long: Vec<u32> = (0..9).collect();
        for (input, extra, param, says) in [
            (
                serde_json::json!("text"),
                serde_json::json!({}),
                "input",
                "token IDs only",
            ),
            (
                serde_json::json!([]),
                serde_json::json!({}),
                "input",
                "input is empty",
            ),
            (
                serde_json::json!([[1], []]),
                serde_json::json!({}),
                "input",
                "input[1] is empty",
            ),
            (
                serde_json::json!([1, 100]),
                serde_json::json!({}),
                "input",
                "token ID 100",
            ),
            (
                serde_json::json!(long),
                serde_json::json!({}),
                "input",
                "maximum",
            ),
            (
                serde_json::json!([1]),
                serde_json::json!({"encoding_format": "hex"}),
                "encoding_format",
                "hex",
            ),
            (
                serde_json::json!([1]),
                serde_json::json!({"dimensions": 8}),
                "dimensions",
                "16 dimensions",
            ),
            (
                serde_json::json!([1]),
                serde_json::json!({"truncate_prompt_tokens": 9}),
                "truncate_prompt_tokens",
                "1 to 8",
            ),
            (
                serde_json::json!([1]),
                serde_json::json!({"truncate_prompt_tokens": 0}),
                "truncate_prompt_tokens",
                "1 to 8",
            ),
            (
                serde_json::json!([1]),
                serde_json::json!({"stream": true}),
                "stream",
                "unsupported parameter",
            ),
        ] {
            let e = embedding(&request(input, extra), &limits()).unwrap_err();
            let env = e.envelope().error;
            assert_eq!(env.param.as_deref(), Some(param), "{}", env.message);
            assert!(env.message.contains(says), "{}", env.message);
        }
    }

    #[test]
    fn inputs_are_taken_or_cut_as_asked() {
        let long: Vec<u32> = (0..12).collect();
        let v = embedding(
            &request(
                serde_json::json!([[1, 2], [3]]),
                serde_json::json!({"encoding_format": "base64", "dimensions": 16}),
            ),
            &limits(),
        )
        .unwrap();
        assert_eq!(
            v,
            ValidPooling {
                inputs: vec![vec![1, 2], vec![3]],
                base64: true
            }
        );
        let v = embedding(
            &request(
                serde_json::json!(long),
                serde_json::json!({"truncate_prompt_tokens": -1}),
            ),
            &limits(),
        )
        .unwrap();
        assert_eq!(v.inputs, vec![(0..8).collect::<Vec<u32>>()]);
        let v = embedding(
            &request(
                serde_json::json!(long),
                serde_json::json!({"truncate_prompt_tokens": 3}),
            ),
            &limits(),
        )
        .unwrap();
        assert_eq!(v.inputs, vec![vec![0, 1, 2]]);
        let r: ClassificationRequest =
            serde_json::from_value(serde_json::json!({"input": [1]})).unwrap();
        let e = classification(&r, &limits()).unwrap_err();
        assert!(e
            .envelope()
            .error
            .message
            .contains("no classification head"));
    }
}
