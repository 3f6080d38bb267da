//! Wire types shared by the blind server and the client: OpenAI-shaped
//! envelopes whose payloads are encrypted token IDs, never text.
//!
//! Requests are parsed permissively here (every field optional, numbers as
//! JSON numbers) and validated by the server, so a bad value gets a 400 that
//! names the field rather than a generic parse error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub mod pooling;
pub mod token_mask;

/// `prompt` of `/v1/completions`: one token-ID sequence or several (vLLM's
/// convention). Text is accepted by the parser only so the server can refuse
/// it with a clear message.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PromptInput {
    Tokens(Vec<u32>),
    Batch(Vec<Vec<u32>>),
    Text(serde_json::Value),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and length fields common to both endpoints.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct GenerationFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub n: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<u64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Keys are encrypted token IDs, as strings (OpenAI's shape).
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// Encrypted IDs that end a choice (the client encrypts EOS, `<|im_end|>`).
    pub stop_token_ids: Option<Vec<u32>>,
    /// The set the first generated token is drawn from, as a
    /// [`token_mask::TokenMask`] in base64 (encrypted IDs): the key holder's
    /// structured output (`docs/protocol.md`). Absent: any token.
    pub first_token_mask: Option<String>,
    /// Start from a prompt the server kept that this one extends, and keep
    /// this one's cache after its prefill (llama.cpp server's name; its
    /// prefill bits are the same either way). Off unless asked.
    #[serde(default)]
    pub cache_prompt: bool,
    /// Generate `max_tokens` regardless of stop tokens (benchmarks).
    #[serde(default)]
    pub ignore_eos: bool,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's end-user tag: accepted, logged as present, never interpreted.
    pub user: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    /// Number of top alternatives to report per token (OpenAI completions).
    pub logprobs: Option<i64>,
    #[serde(flatten)]
    pub fields: GenerationFields,
    /// Fields this API does not define, kept so the server can refuse them
    /// by name rather than silently ignore them.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// One content part of a chat message. Only `token_ids` parts are served;
/// the others parse so that they can be refused clearly.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    TokenIds {
        token_ids: Vec<u32>,
    },
    Text {
        text: serde_json::Value,
    },
    #[serde(other)]
    Other,
}

/// A chat message's content: a list of parts, or (refused) a plain string.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Parts(Vec<ContentPart>),
    Text(String),
}

/// A chat message. The client has rendered the chat template and encrypted
/// it; each message carries its share of that token sequence, and the server
/// concatenates all messages in order. `role` is not interpreted.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: MessageContent,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub fields: GenerationFields,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Log-probability of one (encrypted) token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logprobs {
    pub content: Vec<TokenLogprob>,
}

/// A choice of `/v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub index: usize,
    /// Always empty: the server has no text.
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: Option<Usage>,
}

/// The assistant's answer (or a streamed delta of it), as encrypted IDs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AssistantTokens {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub content: Option<String>,
    pub token_ids: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<AssistantTokens>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<AssistantTokens>,
    pub logprobs: Option<Logprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Option<Usage>,
}

/// `GET /v1/models` entry: the artifact fingerprint lets a client refuse a
/// server that hosts another key's model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub artifact_sha256: String,
    pub vocab_size: usize,
    pub context_length: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// OpenAI's error envelope: `{"error":{"message","type","param","code"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// OpenAI's error `code` for a request that does not fit the context.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// The refusal of a prompt (`param`: `prompt` or `messages`) of
/// `prompt_tokens` that alone fills a context of `context` tokens. The
/// server and the proxy, which each check it, say the same.
pub fn prompt_fills_context(param: &str, context: usize, prompt_tokens: usize) -> String {
    format!(
        "this model's maximum context length is {context} tokens; the {param} alone has \
         {prompt_tokens} and leaves no room for a completion"
    )
}

/// A client's value as an error message quotes it: its JSON, cut to 80
/// characters, so a huge value is not sent back whole.
pub fn shown(value: &serde_json::Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(80) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// OpenAI request fields that clients and frameworks send by default and
/// that change nothing at these values: `response_format` `{"type":
/// "text"}`, `tool_choice` `"none"`, `parallel_tool_calls`, `store: false`,
/// `metadata`, and `service_tier` `"auto"`/`"default"`. `Some(Ok(()))`:
/// accept and ignore it; `Some(Err(why))`: a value we cannot honour;
/// `None`: not one of these fields.
pub fn inert_field(name: &str, value: &serde_json::Value) -> Option<Result<(), String>> {
    use serde_json::Value;
    let ok = |honoured: bool, why: &str| match honoured {
        true => Ok(()),
        false => Err(why.to_owned()),
    };
    Some(match name {
        "response_format" => ok(
            value.is_null() || value.get("type").and_then(Value::as_str) == Some("text"),
            "this server has no vocabulary, so it cannot apply a grammar; \
             structured output is applied by the ee client proxy (it sends first_token_mask)",
        ),
        "tool_choice" => ok(
            value.is_null() || value.as_str() == Some("none"),
            "tools are not supported; only \"none\"",
        ),
        "parallel_tool_calls" => ok(
            value.is_null() || value.is_boolean(),
            "parallel_tool_calls must be true or false",
        ),
        "store" => ok(
            value.is_null() || value == &Value::Bool(false),
            "completions are never stored here; only false",
        ),
        "metadata" => ok(
            value.is_null() || value.is_object(),
            "metadata must be an object",
        ),
        "service_tier" => ok(
            value.is_null() || matches!(value.as_str(), Some("auto" | "default")),
            "only \"auto\" and \"default\" are served",
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inert_fields_are_accepted_at_inert_values_and_values_are_shown_short() {
        use serde_json::json;
        assert_eq!(inert_field("store", &json!(false)), Some(Ok(())));
        assert!(matches!(inert_field("store", &json!(true)), Some(Err(_))));
        assert_eq!(inert_field("tools", &json!([])), None);
        let long = json!("x".repeat(500));
        assert!(shown(&long).chars().count() <= 81);
        assert_eq!(shown(&json!({"a": 1})), r#"{"a":1}"#);
    }

    #[test]
    fn prompts_parse_as_tokens_batches_or_refusable_text() {
        let p: CompletionRequest =
            serde_json::from_str(r#"{"prompt":[1,2,3],"max_tokens":4}"#).unwrap();
        assert_eq!(p.prompt, PromptInput::Tokens(vec![1, 2, 3]));
        assert_eq!(p.fields.max_tokens, Some(4));
        assert!(p.unknown.is_empty());
        let extra: CompletionRequest =
            serde_json::from_str(r#"{"prompt":[1],"stop":["x"],"n":2}"#).unwrap();
        assert_eq!(extra.unknown.keys().collect::<Vec<_>>(), vec!["stop"]);
        assert_eq!(extra.fields.n, Some(2));
        let b: CompletionRequest = serde_json::from_str(r#"{"prompt":[[1],[2,3]]}"#).unwrap();
        assert_eq!(b.prompt, PromptInput::Batch(vec![vec![1], vec![2, 3]]));
        let t: CompletionRequest = serde_json::from_str(r#"{"prompt":"hello"}"#).unwrap();
        assert!(matches!(t.prompt, PromptInput::Text(_)));
    }

    #[test]
    fn chat_messages_carry_token_id_parts() {
        let r: ChatCompletionRequest = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":[{"type":"token_ids","token_ids":[5,6]}]}],"logprobs":true,"top_logprobs":2}"#,
        )
        .unwrap();
        assert_eq!(
            r.messages[0].content,
            MessageContent::Parts(vec![ContentPart::TokenIds {
                token_ids: vec![5, 6]
            }])
        );
        let text: ChatCompletionRequest =
            serde_json::from_str(r#"{"messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(text.messages[0].content, MessageContent::Text("hi".into()));
    }

    #[test]
    fn error_envelope_has_openai_shape() {
        let e = ErrorEnvelope {
            error: ErrorBody {
                message: "m".into(),
                kind: "invalid_request_error".into(),
                param: None,
                code: None,
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"].as_object().unwrap().contains_key("param"));
    }
}
