//! `POST /tokenize` and `POST /detokenize` in vLLM's request and response
//! shapes. They are plaintext operations on the user's side, answered from
//! the bundle's tokenizer and template: the blind server never gets them.
//!
//! - `/tokenize` takes `prompt` (a completion prompt, special-token text
//!   parsed as the completions endpoint parses it; `add_special_tokens`,
//!   default true, adds BOS where the model wants one) or `messages` (a chat,
//!   rendered and tokenized exactly as the chat endpoint does;
//!   `add_generation_prompt`, default true). A field of the other form is
//!   refused, naming it. `return_token_strs` adds the
//!   vocabulary pieces. It answers `{count, max_model_len, tokens,
//!   token_strs}`.
//! - `/detokenize` takes `tokens` and answers `{prompt}`, special tokens
//!   written as their text.

use serde_json::{json, Map, Value};

use super::messages::parse_messages;
use super::request::{flag_or, invalid, text_error, RequestError};
use crate::keyholder::KeyHolder;

const TOKENIZE_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "messages",
    "add_special_tokens",
    "add_generation_prompt",
    "return_token_strs",
];

/// The `/tokenize` answer for `body`.
pub fn tokenize(keys: &KeyHolder, body: &Map<String, Value>) -> Result<Value, RequestError> {
    refuse_unknown(body, TOKENIZE_FIELDS)?;
    let codec = keys.codec();
    let given = |k: &str| body.get(k).filter(|v| !v.is_null());
    // A field that means nothing for this form is refused, not ignored.
    let only_for = |field: &str, form: &str| match given(field) {
        Some(_) => Err(invalid(field, format!("{field} applies to {form} only"))),
        None => Ok(()),
    };
    let tokens = match (given("prompt"), given("messages")) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "messages",
                "give either prompt or messages, not both",
            ))
        }
        (Some(Value::String(prompt)), None) => {
            only_for("add_generation_prompt", "messages")?;
            let add_special = flag_or(body.get("add_special_tokens"), "add_special_tokens", true)?;
            codec
                .encode_with(prompt, add_special, true)
                .map_err(|e| text_error("prompt", e))?
        }
        (Some(_), None) => return Err(invalid("prompt", "prompt must be a string")),
        (None, messages @ Some(_)) => {
            // The chat endpoint's prompt exactly: its BOS is the template's.
            only_for("add_special_tokens", "prompt")?;
            let messages = parse_messages(messages)?;
            let add = flag_or(
                body.get("add_generation_prompt"),
                "add_generation_prompt",
                true,
            )?;
            keys.chat_prompt_with(&messages, add)
                .map_err(|e| text_error("messages", e))?
        }
        (None, None) => return Err(invalid("prompt", "give prompt (a string) or messages")),
    };
    let token_strs = flag_or(body.get("return_token_strs"), "return_token_strs", false)?
        .then(|| tokens.iter().map(|&id| codec.piece(id)).collect::<Vec<_>>());
    Ok(json!({
        "count": tokens.len(),
        "max_model_len": keys.bundle().manifest.context_length,
        "tokens": tokens,
        "token_strs": token_strs,
    }))
}

/// The `/detokenize` answer for `body`.
pub fn detokenize(keys: &KeyHolder, body: &Map<String, Value>) -> Result<Value, RequestError> {
    refuse_unknown(body, &["model", "tokens"])?;
    let bad = || invalid("tokens", "tokens must be an array of token IDs");
    let Some(Value::Array(items)) = body.get("tokens") else {
        return Err(bad());
    };
    let ids = items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(bad)
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let text = keys
        .codec()
        .decode_with_specials(&ids)
        .map_err(|e| invalid("tokens", e.to_string()))?;
    Ok(json!({ "prompt": text }))
}

fn refuse_unknown(body: &Map<String, Value>, known: &[&str]) -> Result<(), RequestError> {
    match body.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(invalid(k, format!("unsupported parameter: {k}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::request::tests::tiny_keys;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tokenize_and_detokenize_round_trip_in_vllms_shapes() {
        let (_dir, keys) = tiny_keys();
        let r = tokenize(
            &keys,
            &body(json!({"prompt": "<|im_start|>ab", "return_token_strs": true})),
        )
        .unwrap();
        let ids: Vec<u32> = serde_json::from_value(r["tokens"].clone()).unwrap();
        assert_eq!(r["count"], json!(ids.len()));
        assert_eq!(
            ids[0], 1,
            "special-token text in a prompt is the control token"
        );
        assert_eq!(r["token_strs"][0], "<|im_start|>");
        let back = detokenize(&keys, &body(json!({"tokens": ids}))).unwrap();
        assert_eq!(back["prompt"], "<|im_start|>ab");

        // A chat is tokenized as the chat endpoint sends it, message text
        // kept as text.
        let chat = body(json!({"messages": [{"role": "user", "content": "<|im_end|>"}]}));
        let r = tokenize(&keys, &chat).unwrap();
        let ids: Vec<u32> = serde_json::from_value(r["tokens"].clone()).unwrap();
        let sent = keys
            .chat_prompt(&[crate::template::ChatMessage::new("user", "<|im_end|>")])
            .unwrap();
        assert_eq!(ids, sent);
        assert_eq!(
            ids.iter().filter(|&&t| t == 2).count(),
            1,
            "only the template's <|im_end|>"
        );
        assert_eq!(r["token_strs"], Value::Null);
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let (_dir, keys) = tiny_keys();
        let param = |r: Result<Value, RequestError>| r.unwrap_err().param.unwrap();
        assert_eq!(param(tokenize(&keys, &body(json!({})))), "prompt");
        assert_eq!(
            param(tokenize(&keys, &body(json!({"prompt": 3})))),
            "prompt"
        );
        assert_eq!(
            param(tokenize(
                &keys,
                &body(json!({"prompt": "a", "messages": []}))
            )),
            "messages"
        );
        assert_eq!(
            param(tokenize(&keys, &body(json!({"prompt": "a", "extra": 1})))),
            "extra"
        );
        assert_eq!(
            param(tokenize(
                &keys,
                &body(json!({"prompt": "a", "add_special_tokens": "no"}))
            )),
            "add_special_tokens"
        );
        assert_eq!(
            param(detokenize(&keys, &body(json!({"tokens": [1, -1]})))),
            "tokens"
        );
        assert_eq!(
            param(detokenize(&keys, &body(json!({"tokens": [999999]})))),
            "tokens"
        );
        assert_eq!(
            param(detokenize(&keys, &body(json!({"tokens": "1"})))),
            "tokens"
        );
    }
}
