//! The proxy's encoder endpoints: OpenAI's `POST /v1/embeddings` and
//! vLLM's `POST /classify`, taking text (a string or a list of strings) or
//! plaintext token IDs. Each text is tokenized as sentence-transformers
//! does (`[CLS] … [SEP]`), encrypted, and sent to the blind server; its
//! answer, in the key's coordinates, is mapped back: embeddings by σ⁻¹,
//! class probabilities by λ⁻¹, with the class names only this side holds.
//! Fields are checked by the same rules as the server's
//! ([`ee_core::wire::pooling`]), before anything is sent.

use ee_core::wire::pooling::{
    base64_floats, check_dimensions, check_input_count, check_unknown, too_long, truncation,
    wants_base64, ClassificationData, ClassificationRequest, ClassificationResponse,
    EmbeddingRequest, EmbeddingResponse, EmbeddingVector, FieldError,
};
use ee_core::wire::PromptInput;
use serde_json::Value;

use super::request::{invalid, RequestError};
use super::served::MODEL_NOT_FOUND;
use crate::keyholder::KeyHolder;
use crate::session::{Session, SessionError};
use crate::Error;

fn refused(e: FieldError) -> RequestError {
    RequestError {
        param: Some(e.param),
        message: e.message,
        code: e.code,
    }
}

fn bad(param: &str, message: impl Into<String>) -> RequestError {
    invalid(param, message)
}

/// The inputs of a request as encrypted token IDs, each within the model's
/// `max` positions: a text is wrapped in `[CLS] … [SEP]` and cut, keeping them, to
/// `truncate_prompt_tokens` when the request asks; token IDs are taken as
/// they are (first tokens kept when cut); anything longer is refused.
fn encrypted_inputs(
    keys: &KeyHolder,
    input: &PromptInput,
    truncate: Option<i64>,
    max: usize,
) -> Result<Vec<Vec<u32>>, RequestError> {
    let keep = truncation(truncate, max).map_err(refused)?;
    let count = match input {
        PromptInput::Tokens(ids) => usize::from(!ids.is_empty()),
        PromptInput::Batch(batch) => batch.len(),
        PromptInput::Text(Value::Array(items)) => items.len(),
        PromptInput::Text(_) => 1,
    };
    check_input_count(count).map_err(refused)?;
    // Text is cut one past the limit at most, so a long one costs no more.
    let limit = keep.unwrap_or(max.saturating_add(1));
    let wrappers = keys.codec().wrapper_tokens();
    let text = |t: &str| {
        if limit <= wrappers {
            return Err(bad(
                "truncate_prompt_tokens",
                format!(
                    "truncate_prompt_tokens {limit} leaves no room beside the {wrappers} special \
                     tokens every text input carries"
                ),
            ));
        }
        keys.codec()
            .encode_input(t, Some(limit))
            .map_err(|e| bad("input", e.to_string()))
    };
    let plain: Vec<Vec<u32>> = match input {
        PromptInput::Tokens(ids) => vec![ids.clone()],
        PromptInput::Batch(batch) => batch.clone(),
        PromptInput::Text(Value::String(s)) => vec![text(s)?],
        PromptInput::Text(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => text(s),
                _ => Err(bad(
                    "input",
                    format!("input[{i}] is not a string; send strings, or arrays of token IDs"),
                )),
            })
            .collect::<Result<_, _>>()?,
        PromptInput::Text(_) => {
            return Err(bad(
                "input",
                "input must be a string, an array of strings, an array of token IDs, or an \
                 array of such arrays",
            ))
        }
    };
    plain
        .into_iter()
        .enumerate()
        .map(|(i, mut ids)| {
            if ids.is_empty() {
                return Err(bad("input", format!("input[{i}] is empty")));
            }
            match keep {
                Some(k) => ids.truncate(k),
                None if ids.len() > max => return Err(refused(too_long(i, max))),
                None => {}
            }
            keys.encrypt(&ids).map_err(|e| bad("input", e.to_string()))
        })
        .collect()
}

/// The name answers carry: the client's, or the proxy's first
/// (`--served-model-name`), refusing another; and the name the server is
/// asked for (the client's, unless the proxy serves names of its own).
fn model_names(
    session: &Session,
    asked: Option<&String>,
) -> Result<(Option<String>, Option<String>), SessionError> {
    let served = &session.served_model_names;
    match asked {
        Some(m) if !served.is_empty() && !served.contains(m) => {
            let mut e = invalid(
                "model",
                format!("model {m:?} is not served here; this proxy serves {served:?}"),
            );
            e.code = Some(MODEL_NOT_FOUND);
            Err(SessionError::Request(e))
        }
        Some(m) if served.is_empty() => Ok((Some(m.clone()), Some(m.clone()))),
        Some(m) => Ok((Some(m.clone()), None)),
        None => Ok((served.first().cloned(), None)),
    }
}

fn require_encoder(keys: &KeyHolder) -> Result<(), SessionError> {
    match keys.is_encoder() {
        true => Ok(()),
        false => Err(SessionError::Request(RequestError {
            param: None,
            message: "this proxy's model is a language model, not an encoder; use \
                      /v1/chat/completions or /v1/completions"
                .into(),
            code: Some("model_not_supported"),
        })),
    }
}

/// The model's positions: the bundle's `max_position_embeddings`, which the
/// key holder read from the model itself (the server's word only for a
/// bundle that lacks it).
async fn max_positions(session: &Session) -> Result<usize, SessionError> {
    match session.keys.bundle().manifest.context_length {
        Some(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        None => Ok(session.server_model().await?.context_length),
    }
}

/// Checks that the server answered each input once, in order.
fn check_indices(indices: impl Iterator<Item = usize>, inputs: usize) -> Result<(), SessionError> {
    let got: Vec<usize> = indices.collect();
    match got.iter().copied().eq(0..inputs) {
        true => Ok(()),
        false => Err(SessionError::Decode(Error::Model(format!(
            "the server answered items {got:?} for {inputs} inputs"
        )))),
    }
}

/// What both endpoints do first: refuse a non-encoder bundle and unknown
/// fields, settle the model names, and encrypt the inputs. Returns the
/// name answers carry, the name the server is asked for, and the inputs.
async fn prepare(
    session: &Session,
    unknown: &std::collections::BTreeMap<String, Value>,
    model: Option<&String>,
    input: &PromptInput,
    truncate: Option<i64>,
) -> Result<(Option<String>, Option<String>, Vec<Vec<u32>>), SessionError> {
    let keys = &session.keys;
    require_encoder(keys)?;
    check_unknown(unknown)
        .map_err(refused)
        .map_err(SessionError::Request)?;
    let (answer_model, forwarded) = model_names(session, model)?;
    let max = max_positions(session).await?;
    let inputs = encrypted_inputs(keys, input, truncate, max).map_err(SessionError::Request)?;
    Ok((answer_model, forwarded, inputs))
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    session: &Session,
    request: EmbeddingRequest,
) -> Result<EmbeddingResponse, SessionError> {
    let keys = &session.keys;
    let (answer_model, forwarded, inputs) = prepare(
        session,
        &request.unknown,
        request.model.as_ref(),
        &request.input,
        request.truncate_prompt_tokens,
    )
    .await?;
    let base64 = wants_base64(request.encoding_format.as_deref())
        .map_err(refused)
        .map_err(SessionError::Request)?;
    let hidden = keys
        .bundle()
        .manifest
        .encoder
        .as_ref()
        .map_or(0, |e| e.hidden_size);
    check_dimensions(request.dimensions, hidden as usize)
        .map_err(refused)
        .map_err(SessionError::Request)?;
    let n = inputs.len();
    let upstream = EmbeddingRequest {
        model: forwarded,
        input: PromptInput::Batch(inputs),
        encoding_format: None,
        dimensions: None,
        truncate_prompt_tokens: None,
        user: None,
        unknown: Default::default(),
    };
    let (mut answer, card): (EmbeddingResponse, _) =
        session.pool("/v1/embeddings", &upstream).await?;
    check_indices(answer.data.iter().map(|d| d.index), n)?;
    for item in &mut answer.data {
        let EmbeddingVector::Float(served) = &item.embedding else {
            return Err(SessionError::Decode(Error::Model(
                "the server sent an embedding not as floats".into(),
            )));
        };
        let plain = keys
            .decrypt_embedding(served)
            .map_err(SessionError::Decode)?;
        item.embedding = match base64 {
            true => EmbeddingVector::Base64(base64_floats(&plain)),
            false => EmbeddingVector::Float(plain),
        };
    }
    answer.model = answer_model.unwrap_or_else(|| card.id.clone());
    Ok(answer)
}

/// `POST /classify`.
pub async fn classify(
    session: &Session,
    request: ClassificationRequest,
) -> Result<ClassificationResponse, SessionError> {
    let keys = &session.keys;
    let (answer_model, forwarded, inputs) = prepare(
        session,
        &request.unknown,
        request.model.as_ref(),
        &request.input,
        request.truncate_prompt_tokens,
    )
    .await?;
    let n = inputs.len();
    let upstream = ClassificationRequest {
        model: forwarded,
        input: PromptInput::Batch(inputs),
        truncate_prompt_tokens: None,
        user: None,
        unknown: Default::default(),
    };
    let (mut answer, card): (ClassificationResponse, _) =
        session.pool("/classify", &upstream).await?;
    check_indices(answer.data.iter().map(|d| d.index), n)?;
    for item in &mut answer.data {
        let (probs, names) = keys
            .decrypt_classes(&item.probs)
            .map_err(SessionError::Decode)?;
        let best = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b]));
        *item = ClassificationData {
            index: item.index,
            label: best.and_then(|i| names.get(i).cloned()),
            num_classes: probs.len(),
            probs,
        };
    }
    answer.model = answer_model.unwrap_or_else(|| card.id.clone());
    Ok(answer)
}
