//! The proxy's encoder endpoints: OpenAI's `POST /v1/embeddings` and
//! vLLM's `POST /classify`, taking text (a string or a list of strings) or
//! plaintext token IDs. Each input is tokenized as sentence-transformers
//! does (`[CLS] … [SEP]`), encrypted, and sent to the blind server; its
//! answer, in the key's coordinates, is mapped back: embeddings by σ⁻¹,
//! class probabilities by λ⁻¹, with the class names only this side holds.

use base64::Engine as _;
use ee_core::wire::pooling::{
    ClassificationData, ClassificationRequest, ClassificationResponse, EmbeddingRequest,
    EmbeddingResponse, EmbeddingVector,
};
use ee_core::wire::{PromptInput, CONTEXT_LENGTH_EXCEEDED};
use serde_json::Value;

use super::request::{invalid, RequestError};
use super::served::MODEL_NOT_FOUND;
use crate::keyholder::KeyHolder;
use crate::session::{Session, SessionError};
use crate::Error;

/// OpenAI's limit on inputs per embeddings request.
pub const MAX_INPUTS: usize = 2048;

/// The inputs of a request as plaintext token IDs, wrapped and checked
/// against the model's `max_positions`: longer ones are refused, or cut
/// when `truncate_prompt_tokens` asks (`-1`: to the model's limit).
fn plaintext_inputs(
    keys: &KeyHolder,
    input: &PromptInput,
    truncate: Option<i64>,
    max_positions: usize,
) -> Result<Vec<Vec<u32>>, RequestError> {
    let keep = match truncate {
        None => None,
        Some(-1) => Some(max_positions),
        Some(k) if k >= 1 && k as u64 <= max_positions as u64 => Some(k as usize),
        Some(k) => {
            return Err(invalid(
                "truncate_prompt_tokens",
                format!(
                    "truncate_prompt_tokens is {k}; use -1 (the model's {max_positions}) or 1 \
                     to {max_positions}"
                ),
            ))
        }
    };
    let text = |t: &str| {
        keys.codec()
            .encode_input(t, Some(keep.unwrap_or(usize::MAX).min(max_positions + 1)))
            .map_err(|e| match e {
                Error::Tokenizer(m) if keep.is_some() => invalid("truncate_prompt_tokens", m),
                e => invalid("input", e.to_string()),
            })
    };
    let inputs: Vec<Vec<u32>> = match input {
        PromptInput::Tokens(ids) if ids.is_empty() => {
            return Err(invalid("input", "input is empty"))
        }
        PromptInput::Tokens(ids) => vec![ids.clone()],
        PromptInput::Batch(batch) => batch.clone(),
        PromptInput::Text(Value::String(s)) => vec![text(s)?],
        PromptInput::Text(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => text(s),
                _ => Err(invalid(
                    "input",
                    format!("input[{i}] is not a string; send strings, or arrays of token IDs"),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(invalid(
                "input",
                "input must be a string, an array of strings, an array of token IDs, or an \
                 array of such arrays",
            ))
        }
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(invalid(
            "input",
            format!("input holds {} items; send 1 to {MAX_INPUTS}", inputs.len()),
        ));
    }
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, mut ids)| {
            if ids.is_empty() {
                return Err(invalid("input", format!("input[{i}] is empty")));
            }
            if let Some(k) = keep {
                ids.truncate(k);
            }
            if ids.len() > max_positions {
                let mut e = invalid(
                    "input",
                    format!(
                        "input[{i}] holds more than {max_positions} tokens, [CLS] and [SEP] \
                         included: this model's maximum. Shorten it, or set \
                         truncate_prompt_tokens to cut it"
                    ),
                );
                e.code = Some(CONTEXT_LENGTH_EXCEEDED);
                return Err(e);
            }
            keys.encrypt(&ids)
                .map_err(|e| invalid("input", e.to_string()))
        })
        .collect()
}

/// The proxy's names for the model (`--served-model-name`): the name
/// answers carry, or a refusal of another one. Without names of its own,
/// the proxy forwards the name for the server to check.
fn answer_model(session: &Session, asked: Option<&String>) -> Result<Option<String>, RequestError> {
    let served = &session.served_model_names;
    match asked {
        Some(m) if !served.is_empty() && !served.contains(m) => {
            let mut e = invalid(
                "model",
                format!("model {m:?} is not served here; this proxy serves {served:?}"),
            );
            e.code = Some(MODEL_NOT_FOUND);
            Err(e)
        }
        Some(m) => Ok(Some(m.clone())),
        None => Ok(served.first().cloned()),
    }
}

/// The name the server is asked for: the client's, unless the proxy
/// serves names of its own (then the server's model, whatever its name).
fn forwarded_model(session: &Session, model: &Option<String>) -> Option<String> {
    match session.served_model_names.is_empty() {
        true => model.clone(),
        false => None,
    }
}

fn not_an_encoder() -> RequestError {
    RequestError {
        param: None,
        message: "this proxy's model is a language model, not an encoder; use \
                  /v1/chat/completions or /v1/completions"
            .into(),
        code: Some("model_not_supported"),
    }
}

fn decode_error(e: impl std::fmt::Display) -> SessionError {
    SessionError::Decode(Error::Model(e.to_string()))
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    session: &Session,
    request: EmbeddingRequest,
) -> Result<EmbeddingResponse, SessionError> {
    let keys = &session.keys;
    if !keys.is_encoder() {
        return Err(SessionError::Request(not_an_encoder()));
    }
    let model = answer_model(session, request.model.as_ref()).map_err(SessionError::Request)?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(SessionError::Request(invalid(
                "encoding_format",
                format!("encoding_format {other:?}: use \"float\" or \"base64\""),
            )))
        }
    };
    let card = session.server_model().await?;
    let inputs = plaintext_inputs(
        keys,
        &request.input,
        request.truncate_prompt_tokens,
        card.context_length,
    )
    .map_err(SessionError::Request)?;
    let upstream = EmbeddingRequest {
        model: forwarded_model(session, &model),
        input: PromptInput::Batch(inputs),
        encoding_format: None,
        // Checked by the server against the model's width, unchanged.
        dimensions: request.dimensions,
        truncate_prompt_tokens: None,
        user: None,
    };
    let (mut answer, card): (EmbeddingResponse, _) =
        session.pool("/v1/embeddings", &upstream).await?;
    for item in &mut answer.data {
        let EmbeddingVector::Float(served) = &item.embedding else {
            return Err(decode_error("the server sent an embedding not as floats"));
        };
        let plain = keys
            .decrypt_embedding(served)
            .map_err(SessionError::Decode)?;
        item.embedding = match base64 {
            true => EmbeddingVector::Base64(
                base64::engine::general_purpose::STANDARD.encode(
                    plain
                        .iter()
                        .flat_map(|x| x.to_le_bytes())
                        .collect::<Vec<u8>>(),
                ),
            ),
            false => EmbeddingVector::Float(plain),
        };
    }
    answer.model = model.unwrap_or_else(|| card.id.clone());
    Ok(answer)
}

/// `POST /classify`.
pub async fn classify(
    session: &Session,
    request: ClassificationRequest,
) -> Result<ClassificationResponse, SessionError> {
    let keys = &session.keys;
    if !keys.is_encoder() {
        return Err(SessionError::Request(not_an_encoder()));
    }
    let model = answer_model(session, request.model.as_ref()).map_err(SessionError::Request)?;
    let card = session.server_model().await?;
    let inputs = plaintext_inputs(
        keys,
        &request.input,
        request.truncate_prompt_tokens,
        card.context_length,
    )
    .map_err(SessionError::Request)?;
    let upstream = ClassificationRequest {
        model: forwarded_model(session, &model),
        input: PromptInput::Batch(inputs),
        truncate_prompt_tokens: None,
        user: None,
    };
    let (mut answer, card): (ClassificationResponse, _) =
        session.pool("/classify", &upstream).await?;
    for item in &mut answer.data {
        let (probs, names) = keys
            .decrypt_classes(&item.probs)
            .map_err(SessionError::Decode)?;
        let best = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        *item = ClassificationData {
            index: item.index,
            label: best.map(|i| {
                names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            }),
            num_classes: probs.len(),
            probs,
        };
    }
    answer.model = model.unwrap_or_else(|| card.id.clone());
    Ok(answer)
}
