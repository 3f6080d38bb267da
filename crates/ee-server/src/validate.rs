//! Request validation, separate from inference: a request either becomes a
//! [`ValidRequest`] the scheduler can run as is, or a 400 naming the field.

use ee_api::ApiError;
use ee_core::wire::token_mask::TokenMask;
use ee_core::wire::{
    ChatCompletionRequest, CompletionRequest, ContentPart, GenerationFields, MessageContent,
    PromptInput,
};
use ee_engine::SamplingParams;

/// What the model constrains.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub vocab_size: usize,
    pub context_length: usize,
    pub max_n: usize,
    pub max_logprobs: usize,
    /// Completion tokens when the request names none; `None` runs to the
    /// end of the context.
    pub default_max_tokens: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    /// Per prompt.
    pub max_tokens: Vec<usize>,
    pub sampling: SamplingParams,
    pub stop_token_ids: Vec<u32>,
    pub top_logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub cache_prompt: bool,
}

const TEXT_REFUSED: &str = "this server only accepts encrypted token IDs; it has no tokenizer. \
Send text through the ee client proxy, which encrypts it";

fn check_ids(param: &str, ids: &[u32], limits: &Limits) -> Result<(), ApiError> {
    match ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
        Some(t) => Err(ApiError::invalid(
            param,
            format!(
                "token ID {t} is outside the vocabulary (0..{})",
                limits.vocab_size
            ),
        )),
        None => Ok(()),
    }
}

fn in_range(param: &str, v: Option<f64>, lo: f64, hi: f64, default: f64) -> Result<f32, ApiError> {
    match v {
        None => Ok(default as f32),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x as f32),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
    }
}

/// What `prompts` came as, for errors: `prompt` or `messages`.
fn common(
    prompt_param: &str,
    prompts: Vec<Vec<u32>>,
    f: &GenerationFields,
    top_logprobs: Option<usize>,
    limits: &Limits,
) -> Result<ValidRequest, ApiError> {
    let n = match f.n {
        None => 1,
        Some(n) if n >= 1 && n as usize <= limits.max_n => n as usize,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("n must be between 1 and {}, got {n}", limits.max_n),
            ))
        }
    };
    // The field the client sent, so that an error names it.
    let requested = match (f.max_completion_tokens, f.max_tokens) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::invalid(
                "max_completion_tokens",
                "max_tokens and max_completion_tokens disagree; send one",
            ))
        }
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        (None, None) => None,
    };
    if let Some((param, v)) = requested {
        if v < 1 {
            return Err(ApiError::invalid(
                param,
                format!("{param} must be at least 1, got {v}"),
            ));
        }
    }
    let context = limits.context_length;
    let mut max_tokens = Vec::with_capacity(prompts.len());
    for p in &prompts {
        // A prompt that leaves no room is the prompt's fault, whatever
        // max_tokens says.
        if p.len() >= context {
            return Err(ApiError::invalid(
                prompt_param,
                ee_core::wire::prompt_fills_context(prompt_param, context, p.len()),
            )
            .with_code(ee_core::wire::CONTEXT_LENGTH_EXCEEDED));
        }
        let room = context - p.len();
        let want = match requested {
            Some((param, v)) if v as usize > room => {
                return Err(ApiError::invalid(
                    param,
                    format!(
                        "this model's maximum context length is {context} tokens; the request \
                         needs {} ({} in the {prompt_param}, {v} for the completion)",
                        p.len() + v as usize,
                        p.len()
                    ),
                )
                .with_code(ee_core::wire::CONTEXT_LENGTH_EXCEEDED));
            }
            Some((_, v)) => v as usize,
            None => limits.default_max_tokens.map_or(room, |d| d.min(room)),
        };
        max_tokens.push(want);
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k >= 1 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("top_k must be -1, 0 or positive, got {k}"),
            ))
        }
    };
    let top_p = match f.top_p {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {p}"),
            ))
        }
        p => p.unwrap_or(1.0) as f32,
    };
    let repetition_penalty = match f.repetition_penalty {
        Some(r) if !(r > 0.0 && r <= 10.0) => {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 10], got {r}"),
            ))
        }
        r => r.unwrap_or(1.0) as f32,
    };
    let mut logit_bias = Vec::new();
    for (k, v) in f.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias key {k:?} is not a token ID"),
            )
        })?;
        check_ids("logit_bias", &[id], limits)?;
        logit_bias.push((id, in_range("logit_bias", Some(*v), -100.0, 100.0, 0.0)?));
    }
    let stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
    check_ids("stop_token_ids", &stop_token_ids, limits)?;
    if stop_token_ids.len() > 64 {
        return Err(ApiError::invalid(
            "stop_token_ids",
            "at most 64 stop token IDs",
        ));
    }
    let first_token_mask = f
        .first_token_mask
        .as_deref()
        .map(|m| TokenMask::from_base64(m, limits.vocab_size))
        .transpose()
        .map_err(|e| ApiError::invalid("first_token_mask", e.to_string()))?
        .map(std::sync::Arc::new);
    if f.stream_options.is_some() && !f.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    let sampling = SamplingParams {
        temperature: in_range("temperature", f.temperature, 0.0, 2.0, 1.0)?,
        top_k,
        top_p,
        min_p: in_range("min_p", f.min_p, 0.0, 1.0, 0.0)?,
        repetition_penalty,
        presence_penalty: in_range("presence_penalty", f.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: in_range("frequency_penalty", f.frequency_penalty, -2.0, 2.0, 0.0)?,
        logit_bias,
        first_token_mask,
        seed: f.seed,
    };
    Ok(ValidRequest {
        prompts,
        n,
        max_tokens,
        sampling,
        stop_token_ids: if f.ignore_eos {
            Vec::new()
        } else {
            stop_token_ids
        },
        top_logprobs,
        stream: f.stream,
        include_usage: f.stream_options.as_ref().is_some_and(|o| o.include_usage),
        cache_prompt: f.cache_prompt,
    })
}

/// Refuses fields the protocol does not define, naming them.
fn refuse_unknown(
    unknown: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Result<(), ApiError> {
    // Fields that change nothing at their values are accepted and ignored.
    let mut refused =
        unknown.iter().filter_map(
            |(name, value)| match ee_core::wire::inert_field(name, value) {
                Some(Ok(())) => None,
                Some(Err(why)) => Some((name, Some(why))),
                None => Some((name, None)),
            },
        );
    let Some((name, why)) = refused.next() else {
        return Ok(());
    };
    if let Some(why) = why {
        return Err(ApiError::invalid(
            name,
            format!(
                "unsupported {name} {}: {why}",
                ee_core::wire::shown(&unknown[name])
            ),
        ));
    }
    let why = match name.as_str() {
        "stop" => "stop strings need text, which this server never sees; the client applies them. Send stop_token_ids (encrypted) instead",
        "tools" | "functions" => "it is not supported by this server",
        "suffix" | "echo" | "best_of" => "it is not supported by this server",
        _ => "it is not a field of this API",
    };
    Err(ApiError::invalid(
        name,
        format!("unsupported field {name:?}: {why}"),
    ))
}

fn logprobs_count(param: &str, v: Option<i64>, limits: &Limits) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(k) if k >= 0 && k as usize <= limits.max_logprobs => Ok(Some(k as usize)),
        Some(k) => Err(ApiError::invalid(
            param,
            format!(
                "{param} must be between 0 and {}, got {k}",
                limits.max_logprobs
            ),
        )),
    }
}

pub fn completion(r: &CompletionRequest, limits: &Limits) -> Result<ValidRequest, ApiError> {
    refuse_unknown(&r.unknown)?;
    let prompts = match &r.prompt {
        PromptInput::Tokens(t) => vec![t.clone()],
        PromptInput::Batch(b) => b.clone(),
        PromptInput::Text(_) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "prompt must be a list of token IDs or a list of such lists: {TEXT_REFUSED}"
                ),
            ))
        }
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    for p in &prompts {
        check_ids("prompt", p, limits)?;
    }
    common(
        "prompt",
        prompts,
        &r.fields,
        logprobs_count("logprobs", r.logprobs, limits)?,
        limits,
    )
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

pub fn chat(r: &ChatCompletionRequest, limits: &Limits) -> Result<ValidRequest, ApiError> {
    refuse_unknown(&r.unknown)?;
    if r.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let mut prompt = Vec::new();
    for (i, m) in r.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!("unknown role {:?}", m.role),
            ));
        }
        let param = format!("messages[{i}].content");
        let parts = match &m.content {
            MessageContent::Text(_) => {
                return Err(ApiError::invalid(
                    &param,
                    format!("text content is not accepted: {TEXT_REFUSED}"),
                ))
            }
            MessageContent::Parts(p) => p,
        };
        for part in parts {
            match part {
                ContentPart::TokenIds { token_ids } => prompt.extend_from_slice(token_ids),
                ContentPart::Text { .. } => {
                    return Err(ApiError::invalid(
                        &param,
                        format!("text parts are not accepted: {TEXT_REFUSED}"),
                    ))
                }
                ContentPart::Other => {
                    return Err(ApiError::invalid(
                        &param,
                        "only {\"type\": \"token_ids\"} content parts are accepted",
                    ))
                }
            }
        }
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "the messages hold no token IDs",
        ));
    }
    check_ids("messages", &prompt, limits)?;
    let top = match (r.logprobs, r.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs: true",
            ))
        }
        (false, None) => None,
        (true, k) => Some(logprobs_count("top_logprobs", k.or(Some(0)), limits)?.unwrap_or(0)),
    };
    common("messages", vec![prompt], &r.fields, top, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        vocab_size: 100,
        context_length: 50,
        max_n: 4,
        max_logprobs: 5,
        default_max_tokens: None,
    };

    fn completion_json(v: serde_json::Value) -> Result<ValidRequest, ApiError> {
        completion(&serde_json::from_value(v).unwrap(), &LIMITS)
    }

    #[test]
    fn a_good_request_validates_with_defaults() {
        let v =
            completion_json(serde_json::json!({"prompt": [1, 2, 3], "temperature": 0})).unwrap();
        assert_eq!(v.max_tokens, vec![47]);
        assert_eq!(v.sampling.temperature, 0.0);
        assert_eq!(v.n, 1);
        let capped = Limits {
            default_max_tokens: Some(10),
            ..LIMITS
        };
        let r = serde_json::from_value(serde_json::json!({"prompt": [[1, 2, 3], vec![1; 45]]}))
            .unwrap();
        assert_eq!(completion(&r, &capped).unwrap().max_tokens, vec![10, 5]);
    }

    #[test]
    fn fields_frameworks_send_by_default_are_accepted_and_others_named() {
        let ok = completion_json(
            serde_json::json!({"prompt": [1], "response_format": {"type": "text"},
            "tool_choice": "none", "parallel_tool_calls": false, "store": false, "metadata": {},
            "service_tier": "default"}),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
        for (field, value) in [
            (
                "response_format",
                serde_json::json!({"type": "json_schema"}),
            ),
            ("tool_choice", serde_json::json!("required")),
            ("store", serde_json::json!(true)),
            ("service_tier", serde_json::json!("flex")),
            ("logit_scale", serde_json::json!(1)),
        ] {
            let mut body = serde_json::json!({"prompt": [1]});
            body[field] = value;
            let e = completion_json(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field));
        }
    }

    #[test]
    fn an_overflow_names_what_is_too_long() {
        let long: Vec<u32> = vec![1; 50];
        for (body, param) in [
            (serde_json::json!({"prompt": long}), "prompt"),
            (
                serde_json::json!({"prompt": long, "max_tokens": 1}),
                "prompt",
            ),
            (
                serde_json::json!({"prompt": [1], "max_tokens": 50}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": [1], "max_completion_tokens": 50}),
                "max_completion_tokens",
            ),
        ] {
            let e = completion_json(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert_eq!(e.code, Some("context_length_exceeded"), "{body}");
        }
        let request: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "messages": [{"role": "user", "content": [{"type": "token_ids", "token_ids": long}]}]}))
        .unwrap();
        assert_eq!(
            chat(&request, &LIMITS).unwrap_err().param.as_deref(),
            Some("messages")
        );
    }

    #[test]
    fn bad_fields_name_themselves() {
        for (body, param) in [
            (serde_json::json!({"prompt": "text"}), "prompt"),
            (serde_json::json!({"prompt": []}), "prompt"),
            (serde_json::json!({"prompt": [[1], []]}), "prompt"),
            (serde_json::json!({"prompt": [100]}), "prompt"),
            (
                serde_json::json!({"prompt": [1], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                serde_json::json!({"prompt": [1], "max_tokens": 50}),
                "max_tokens",
            ),
            (serde_json::json!({"prompt": [1], "n": 5}), "n"),
            (
                serde_json::json!({"prompt": [1], "temperature": 3}),
                "temperature",
            ),
            (serde_json::json!({"prompt": [1], "top_p": 0}), "top_p"),
            (serde_json::json!({"prompt": [1], "top_k": -2}), "top_k"),
            (
                serde_json::json!({"prompt": [1], "logit_bias": {"x": 1}}),
                "logit_bias",
            ),
            (
                serde_json::json!({"prompt": [1], "logit_bias": {"100": 1}}),
                "logit_bias",
            ),
            (
                serde_json::json!({"prompt": [1], "stop_token_ids": [100]}),
                "stop_token_ids",
            ),
            (
                serde_json::json!({"prompt": [1], "first_token_mask": "AAAA"}),
                "first_token_mask",
            ),
            (
                serde_json::json!({"prompt": [1], "logprobs": 6}),
                "logprobs",
            ),
            (
                serde_json::json!({"prompt": [1], "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (serde_json::json!({"prompt": [1], "stop": ["\n"]}), "stop"),
            (serde_json::json!({"prompt": [1], "tools": []}), "tools"),
        ] {
            let err = completion_json(body.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}");
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn chat_concatenates_token_parts_and_refuses_text() {
        let r: ChatCompletionRequest = serde_json::from_value(serde_json::json!({"messages": [
            {"role": "system", "content": [{"type": "token_ids", "token_ids": [1, 2]}]},
            {"role": "user", "content": [{"type": "token_ids", "token_ids": [3]}]}
        ], "logprobs": true, "top_logprobs": 2}))
        .unwrap();
        let v = chat(&r, &LIMITS).unwrap();
        assert_eq!(v.prompts, vec![vec![1, 2, 3]]);
        assert_eq!(v.top_logprobs, Some(2));
        let text: ChatCompletionRequest = serde_json::from_value(
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        let err = chat(&text, &LIMITS).unwrap_err();
        assert!(err.message.contains("only accepts encrypted token IDs"));
    }
}
