//! Validation and translation of a plaintext OpenAI request into the blind
//! server's encrypted one, typed as `ee_core::wire` defines it. Everything
//! that needs the key or the tokenizer is checked here; plain numeric fields
//! (temperature, max_tokens, …) are only type-checked and the server
//! validates their ranges, so there is one set of limits.

use std::collections::BTreeMap;

use ee_core::wire::{
    self, ChatCompletionRequest, CompletionRequest, GenerationFields, PromptInput,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::keyholder::KeyHolder;
use crate::proxy::messages::parse_messages;
use crate::structured::{response_format_grammar, Constraint};
use crate::tools::{forced_grammar, parse, ToolParsing, ToolRequest};
use crate::upstream::{Endpoint, UpstreamRequest};

/// A 400 about the plaintext request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub param: Option<String>,
    pub message: String,
    /// OpenAI's machine-readable `code`, where there is one.
    pub code: Option<&'static str>,
}

pub(crate) fn invalid(param: &str, message: impl Into<String>) -> RequestError {
    RequestError {
        param: Some(param.into()),
        message: message.into(),
        code: None,
    }
}

/// A 400 about text `param` that could not become a prompt: too long for
/// the context (`context_length_exceeded`, as the server names it), refused
/// by the template, or not tokenizable.
pub(crate) fn text_error(param: &str, e: crate::Error) -> RequestError {
    match e {
        crate::Error::PromptTooLong { at_least, limit } => RequestError {
            code: Some(wire::CONTEXT_LENGTH_EXCEEDED),
            ..invalid(
                param,
                format!(
                    "this model's maximum context length is {limit} tokens; the {param} \
                     alone come to at least {at_least}"
                ),
            )
        },
        e => invalid(param, e.to_string()),
    }
}

/// Fields passed to the server as they are (it validates them).
const PASSED: &[&str] = &[
    "model",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "cache_prompt",
    "user",
];
/// Fields this proxy reads and rewrites.
const TRANSLATED: &[&str] = &[
    "stop",
    "stop_token_ids",
    "logit_bias",
    "stream",
    "stream_options",
    "response_format",
    "ee_trace",
];
const CHAT_ONLY: &[&str] = &[
    "messages",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
];
const COMPLETION_ONLY: &[&str] = &["prompt", "logprobs"];

/// Most stop strings a request may carry.
pub const MAX_STOPS: usize = 16;

/// Which logprobs shape the answer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsShape {
    None,
    Chat,
    Completion,
}

/// A request ready to send: the server's encrypted body plus what the proxy
/// needs to turn the answer back into text.
#[derive(Debug, Clone)]
pub struct Translated {
    pub endpoint: Endpoint,
    pub upstream: UpstreamRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub stops: Vec<String>,
    /// Plaintext prompt tokens, summed over prompts (for usage).
    pub prompt_tokens: usize,
    /// What the server is sent (for the page's "what the server saw").
    pub encrypted_prompts: Vec<Vec<u32>>,
    /// Choices the answer has: prompts × n.
    pub choices: usize,
    pub logprobs: LogprobsShape,
    /// Proxy extension: chunks also carry the encrypted IDs.
    pub trace: bool,
    /// The `model` the client asked for, echoed back.
    pub model: Option<String>,
    /// The grammar the answer must follow (structured output, a forced
    /// tool call), fresh.
    pub constraint: Option<Constraint>,
    /// How to read tool calls out of the answer, when the request offered
    /// tools and did not say `tool_choice: "none"`.
    pub tool_calls: Option<ToolParsing>,
}

pub fn translate(
    keys: &KeyHolder,
    endpoint: Endpoint,
    body: &Map<String, Value>,
) -> Result<Translated, RequestError> {
    let own = match endpoint {
        Endpoint::Chat => CHAT_ONLY,
        Endpoint::Completion => COMPLETION_ONLY,
    };
    for (k, v) in body {
        if [PASSED, TRANSLATED, own]
            .iter()
            .any(|l| l.contains(&k.as_str()))
        {
            continue;
        }
        // Fields that change nothing at their values are accepted, and not
        // forwarded; the server would accept them too.
        match ee_core::wire::inert_field(k, v) {
            Some(Ok(())) => {}
            Some(Err(why)) => {
                let v = ee_core::wire::shown(v);
                return Err(invalid(k, format!("unsupported {k} {v}: {why}")));
            }
            None => return Err(invalid(k, format!("unsupported parameter: {k}"))),
        }
    }
    let null_is_absent = |k: &str| body.get(k).filter(|v| !v.is_null());

    let tools = ToolRequest::parse(null_is_absent("tools"), null_is_absent("tool_choice"))?;
    let (prompts, tool_format) = match endpoint {
        Endpoint::Chat => {
            let messages = parse_messages(null_is_absent("messages"))?;
            // A conversation with tool turns takes the tool path even
            // without `tools` (frameworks often drop them on the last call).
            let tool_turns = messages
                .iter()
                .any(|m| m.role == "tool" || !m.tool_calls.is_empty());
            let (ids, format) = match (&tools, tool_turns) {
                (Some(t), _) => keys
                    .chat_prompt_with_tools(&messages, &t.tools)
                    .map(|(ids, f)| (ids, Some(f))),
                (None, true) => keys
                    .chat_prompt_with_tools(&messages, &[])
                    .map(|(ids, _)| (ids, None)),
                (None, false) => keys.chat_prompt(&messages).map(|ids| (ids, None)),
            }
            .map_err(|e| text_error("messages", e))?;
            (vec![ids], format)
        }
        Endpoint::Completion => (parse_prompt(keys, null_is_absent("prompt"))?, None),
    };
    if prompts.iter().any(Vec::is_empty) {
        return Err(invalid(
            if endpoint == Endpoint::Chat {
                "messages"
            } else {
                "prompt"
            },
            "the prompt is empty",
        ));
    }
    let encrypted_prompts = prompts
        .iter()
        .map(|p| keys.encrypt(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("prompt", e.to_string()))?;

    let mut stop_ids: Vec<u32> = keys.stop_ids().to_vec();
    stop_ids.extend(parse_token_ids(
        keys,
        "stop_token_ids",
        null_is_absent("stop_token_ids"),
    )?);
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let fields = GenerationFields {
        max_tokens: typed(body, "max_tokens", "an integer")?,
        max_completion_tokens: typed(body, "max_completion_tokens", "an integer")?,
        n: typed(body, "n", "an integer")?,
        temperature: typed(body, "temperature", "a number")?,
        top_p: typed(body, "top_p", "a number")?,
        top_k: typed(body, "top_k", "an integer")?,
        min_p: typed(body, "min_p", "a number")?,
        seed: typed(body, "seed", "a non-negative integer")?,
        presence_penalty: typed(body, "presence_penalty", "a number")?,
        frequency_penalty: typed(body, "frequency_penalty", "a number")?,
        repetition_penalty: typed(body, "repetition_penalty", "a number")?,
        logit_bias: null_is_absent("logit_bias")
            .map(|b| encrypt_logit_bias(keys, b))
            .transpose()?,
        stop_token_ids: Some(
            keys.encrypt(&stop_ids)
                .map_err(|e| invalid("stop_token_ids", e.to_string()))?,
        ),
        ignore_eos: typed(body, "ignore_eos", "true or false")?.unwrap_or(false),
        first_token_mask: None,
        // llama.cpp server's field: the server keeps this prompt's cache
        // for a later request that extends it (a chat's next turn).
        cache_prompt: typed(body, "cache_prompt", "true or false")?.unwrap_or(false),
        // The proxy always streams from the server, so that a stop string
        // can cancel the rest at once; it counts usage itself.
        stream: true,
        stream_options: None,
        user: typed(body, "user", "a string")?,
    };
    let n = fields.n.unwrap_or(1).max(1) as usize;
    let forced = match (&tools, tool_format) {
        (Some(t), Some(format)) => forced_grammar(t, format, &|text| keys.special_id(text)),
        _ => None,
    };
    let grammar = match null_is_absent("response_format") {
        Some(v) => response_format_grammar(v)?,
        None => None,
    };
    let constraint = match (grammar, forced) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "response_format",
                "a response_format cannot be combined with a tool_choice that forces a call",
            ))
        }
        (Some(g), None) => Some(constrain(keys, g, "response_format", prompts.len() * n)?),
        (None, Some(g)) => Some(constrain(keys, g, "tool_choice", prompts.len() * n)?),
        (None, None) => None,
    };
    let model = typed::<String>(body, "model", "a string")?;
    let (upstream, logprobs) = match endpoint {
        Endpoint::Chat => {
            let logprobs = typed(body, "logprobs", "true or false")?.unwrap_or(false);
            let request = ChatCompletionRequest {
                model: model.clone(),
                messages: Vec::new(),
                logprobs,
                top_logprobs: typed(body, "top_logprobs", "an integer")?,
                fields,
                unknown: BTreeMap::new(),
            };
            let shape = match logprobs {
                true => LogprobsShape::Chat,
                false => LogprobsShape::None,
            };
            let mut upstream = UpstreamRequest::Chat(request);
            upstream.set_prompt(encrypted_prompts[0].clone());
            (upstream, shape)
        }
        Endpoint::Completion => {
            let logprobs = typed(body, "logprobs", "an integer")?;
            let request = CompletionRequest {
                model: model.clone(),
                prompt: PromptInput::Batch(encrypted_prompts.clone()),
                logprobs,
                fields,
                unknown: BTreeMap::new(),
            };
            let shape = match logprobs {
                Some(_) => LogprobsShape::Completion,
                None => LogprobsShape::None,
            };
            (UpstreamRequest::Completion(request), shape)
        }
    };
    let stream = flag(null_is_absent("stream"), "stream")?;
    let include_usage = match null_is_absent("stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(invalid(
                "stream_options",
                "stream_options needs stream: true",
            ))
        }
        Some(Value::Object(o)) => flag(
            o.get("include_usage").filter(|v| !v.is_null()),
            "stream_options.include_usage",
        )?,
        Some(_) => {
            return Err(invalid(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };
    Ok(Translated {
        endpoint,
        upstream,
        stream,
        include_usage,
        stops: parse_stops(null_is_absent("stop"))?,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        choices: prompts.len().saturating_mul(n),
        encrypted_prompts,
        logprobs,
        trace: flag(null_is_absent("ee_trace"), "ee_trace")?,
        model,
        constraint,
        tool_calls: match (tools.filter(ToolRequest::parses_calls), tool_format) {
            (Some(_), Some(format)) => Some(ToolParsing {
                format,
                parallel: flag_or(
                    null_is_absent("parallel_tool_calls"),
                    "parallel_tool_calls",
                    true,
                )?,
                trigger_ids: parse::triggers(format)
                    .iter()
                    .filter_map(|t| keys.special_id(t))
                    .collect(),
            }),
            _ => None,
        },
    })
}

/// The constraint of `grammar`, which `param` asked for. It is validated
/// token by token for one answer at a time, so it takes one choice.
fn constrain(
    keys: &KeyHolder,
    grammar: llguidance::api::TopLevelGrammar,
    param: &str,
    choices: usize,
) -> Result<Constraint, RequestError> {
    if choices > 1 {
        return Err(invalid(
            "n",
            format!(
                "a constrained answer ({param}) takes one choice per request (n = 1, one prompt)"
            ),
        ));
    }
    let grammars = keys.grammars().map_err(|e| {
        invalid(
            param,
            format!("constrained decoding is unavailable for this model: {e}"),
        )
    })?;
    grammars.constraint(grammar, param)
}

/// A field the server validates, type-checked here so that a wrong type is
/// a 400 naming it; `null` is absent.
fn typed<T: DeserializeOwned>(
    body: &Map<String, Value>,
    param: &str,
    what: &str,
) -> Result<Option<T>, RequestError> {
    typed_at(body, param, param, what)
}

/// The field `key` of `object`, typed; a wrong type is a 400 naming
/// `param` (the field's full name, `messages[0].name`); `null` is absent.
pub(crate) fn typed_at<T: DeserializeOwned>(
    object: &Map<String, Value>,
    key: &str,
    param: &str,
    what: &str,
) -> Result<Option<T>, RequestError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| invalid(param, format!("{key} must be {what}"))),
    }
}

fn flag(v: Option<&Value>, param: &str) -> Result<bool, RequestError> {
    flag_or(v, param, false)
}

/// A boolean field, `default` when absent or null.
pub(crate) fn flag_or(v: Option<&Value>, param: &str, default: bool) -> Result<bool, RequestError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(param, format!("{param} must be true or false"))),
    }
}

/// A completion prompt: text, several texts, or plaintext token IDs (one
/// list or several), as OpenAI accepts.
fn parse_prompt(keys: &KeyHolder, v: Option<&Value>) -> Result<Vec<Vec<u32>>, RequestError> {
    let encode = |s: &str| keys.codec().encode(s).map_err(|e| text_error("prompt", e));
    let bad = || {
        invalid(
            "prompt",
            "prompt must be a string, an array of strings, or token IDs",
        )
    };
    match v {
        Some(Value::String(s)) => Ok(vec![encode(s)?]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(invalid("prompt", "the prompt is empty"))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|i| i.as_str().ok_or_else(bad).and_then(encode))
                .collect(),
            Value::Number(_) => Ok(vec![parse_token_ids(keys, "prompt", v)?]),
            Value::Array(_) => items
                .iter()
                .map(|i| parse_token_ids(keys, "prompt", Some(i)))
                .collect(),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

fn parse_token_ids(
    keys: &KeyHolder,
    param: &str,
    v: Option<&Value>,
) -> Result<Vec<u32>, RequestError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let items = v
        .as_array()
        .ok_or_else(|| invalid(param, format!("{param} must be an array of token IDs")))?;
    items
        .iter()
        .map(|t| {
            t.as_u64()
                .filter(|&id| id < u64::from(keys.vocab_size()))
                .map(|id| id as u32)
                .ok_or_else(|| {
                    invalid(
                        param,
                        format!(
                            "{t} is not a token ID of this model (0..{})",
                            keys.vocab_size()
                        ),
                    )
                })
        })
        .collect()
}

fn parse_stops(v: Option<&Value>) -> Result<Vec<String>, RequestError> {
    let stops: Vec<String> = match v {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid("stop", "stop must be a string or an array of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(invalid(
                "stop",
                "stop must be a string or an array of strings",
            ))
        }
    };
    if stops.len() > MAX_STOPS {
        return Err(invalid("stop", format!("at most {MAX_STOPS} stop strings")));
    }
    if stops.iter().any(String::is_empty) {
        return Err(invalid("stop", "stop strings must not be empty"));
    }
    Ok(stops)
}

/// `logit_bias` keys are plaintext token IDs; the server gets encrypted ones.
fn encrypt_logit_bias(keys: &KeyHolder, v: &Value) -> Result<BTreeMap<String, f64>, RequestError> {
    let Value::Object(map) = v else {
        return Err(invalid(
            "logit_bias",
            "logit_bias must map token IDs to biases",
        ));
    };
    let mut out = BTreeMap::new();
    for (k, bias) in map {
        let id = k
            .parse::<u32>()
            .ok()
            .filter(|&id| id < keys.vocab_size())
            .ok_or_else(|| {
                invalid(
                    "logit_bias",
                    format!("{k:?} is not a token ID of this model"),
                )
            })?;
        let cipher = keys
            .encrypt(&[id])
            .map_err(|e| invalid("logit_bias", e.to_string()))?[0];
        let bias = bias
            .as_f64()
            .ok_or_else(|| invalid("logit_bias", "logit_bias values must be numbers"))?;
        out.insert(cipher.to_string(), bias);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
