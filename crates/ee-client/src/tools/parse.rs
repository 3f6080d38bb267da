//! A model's answer back into OpenAI `tool_calls`, for the call formats
//! that chat templates define. What does not parse as calls stays content:
//! a malformed call is the model's text, never an error.
//!
//! - Hermes (Qwen2.5, Hermes, SmolLM3, and our fallback prompt):
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one
//!   block per call, after optional content.
//! - Llama 3.1/3.2: the whole answer is `{"name": ..., "parameters": {...}}`
//!   (several joined by `;`), optionally after `<|python_tag|>`.
//! - Mistral: `[TOOL_CALLS]` then a JSON array of
//!   `{"name": ..., "arguments": {...}}` (v11 tokenizers write
//!   `[TOOL_CALLS]name[ARGS]{...}` instead; both are read).

use serde_json::{Map, Value};

use super::ToolFormat;

/// One call, as OpenAI returns it: `arguments` is JSON text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// Given by [`super::ToolParsing`]; empty from [`parse`].
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// An answer split into content and calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedAnswer {
    pub content: String,
    pub calls: Vec<ToolCall>,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
pub(crate) const PYTHON_TAG: &str = "<|python_tag|>";
pub(crate) const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

/// Whether a special token spelled `text` is part of a call format (kept
/// in the text calls are parsed from; other special tokens are not).
pub fn is_call_marker(text: &[u8]) -> bool {
    [
        HERMES_OPEN,
        HERMES_CLOSE,
        PYTHON_TAG,
        MISTRAL_CALLS,
        MISTRAL_ARGS,
    ]
    .iter()
    .any(|m| m.as_bytes() == text)
}

/// Splits `text` (decoded with its special tokens) into content and calls;
/// with no call found, all of it is content.
pub fn parse(format: ToolFormat, text: &str) -> ParsedAnswer {
    let calls = match format {
        ToolFormat::Hermes => hermes(text),
        ToolFormat::Llama3 => llama3(text),
        ToolFormat::Mistral => mistral(text),
    };
    calls.unwrap_or_else(|| ParsedAnswer {
        content: text.to_owned(),
        calls: Vec::new(),
    })
}

/// Where in `text` a call may begin: the earliest trigger of the format
/// (streaming holds text back from there). Llama 3's bare JSON call can
/// only begin the answer, so it counts only when `text` is the answer's
/// start (`at_start`).
pub fn call_start(format: ToolFormat, text: &str, at_start: bool) -> Option<usize> {
    match format {
        ToolFormat::Hermes => text.find(HERMES_OPEN),
        ToolFormat::Mistral => text.find(MISTRAL_CALLS),
        ToolFormat::Llama3 => match text.find(PYTHON_TAG) {
            Some(i) => Some(i),
            None => (at_start && text.trim_start().starts_with('{')).then_some(0),
        },
    }
}

/// The triggers whose beginning at the end of streamed text must be held
/// until the next piece decides it.
pub fn triggers(format: ToolFormat) -> &'static [&'static str] {
    match format {
        ToolFormat::Hermes => &[HERMES_OPEN],
        ToolFormat::Mistral => &[MISTRAL_CALLS],
        ToolFormat::Llama3 => &[PYTHON_TAG],
    }
}

/// `{"name": string, <args_key>: object or JSON text}` as a call.
fn call_of(v: &Value, args_keys: &[&str]) -> Option<ToolCall> {
    let o = v.as_object()?;
    let name = o.get("name")?.as_str()?.to_owned();
    let args = args_keys
        .iter()
        .find_map(|k| o.get(*k))
        .cloned()
        .unwrap_or(Value::Object(Map::new()));
    let arguments = match args {
        Value::Object(_) => args.to_string(),
        // Some models write the arguments as JSON text already.
        Value::String(s) if serde_json::from_str::<Map<String, Value>>(&s).is_ok() => s,
        _ => return None,
    };
    Some(ToolCall {
        id: String::new(),
        name,
        arguments,
    })
}

fn hermes(text: &str) -> Option<ParsedAnswer> {
    let start = text.find(HERMES_OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[start..];
    while let Some(open) = rest.find(HERMES_OPEN) {
        if !rest[..open].trim().is_empty() {
            return None; // text between calls: not a clean call list
        }
        let body = &rest[open + HERMES_OPEN.len()..];
        // A last call cut off before its closing tag still counts if its
        // JSON is whole (models stop at EOS right after it).
        let (json, after) = match body.find(HERMES_CLOSE) {
            Some(close) => (&body[..close], &body[close + HERMES_CLOSE.len()..]),
            None => (body, ""),
        };
        let v: Value = serde_json::from_str(json.trim()).ok()?;
        calls.push(call_of(&v, &["arguments", "parameters"])?);
        rest = after;
    }
    if !rest.trim().is_empty() {
        return None;
    }
    Some(ParsedAnswer {
        content: text[..start].trim_end().to_owned(),
        calls,
    })
}

fn llama3(text: &str) -> Option<ParsedAnswer> {
    let body = text.trim();
    let mut rest = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim_start();
    if !rest.starts_with('{') {
        return None;
    }
    // Several calls are joined by `;` (Llama 3.2's prompt asks for that).
    let mut calls = Vec::new();
    loop {
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        calls.push(call_of(&v, &["parameters", "arguments"])?);
        rest = rest[values.byte_offset()..].trim_start();
        match rest.strip_prefix(';') {
            Some(next) => rest = next.trim_start(),
            None if rest.is_empty() => break,
            None => return None,
        }
    }
    Some(ParsedAnswer {
        content: String::new(),
        calls,
    })
}

fn mistral(text: &str) -> Option<ParsedAnswer> {
    let start = text.find(MISTRAL_CALLS)?;
    let content = text[..start].trim_end().to_owned();
    let body = text[start + MISTRAL_CALLS.len()..].trim();
    let calls = if body.starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(body).ok()?;
        v.iter()
            .map(|c| call_of(c, &["arguments", "parameters"]))
            .collect::<Option<Vec<_>>>()?
    } else {
        // v11: name[ARGS]{json}, repeated after further [TOOL_CALLS].
        body.split(MISTRAL_CALLS)
            .map(|one| {
                let (name, args) = one.split_once(MISTRAL_ARGS)?;
                let args: Map<String, Value> = serde_json::from_str(args.trim()).ok()?;
                Some(ToolCall {
                    id: String::new(),
                    name: name.trim().to_owned(),
                    arguments: Value::Object(args).to_string(),
                })
            })
            .collect::<Option<Vec<_>>>()?
    };
    (!calls.is_empty()).then_some(ParsedAnswer { content, calls })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: String::new(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_calls_with_and_without_content_and_several_at_once() {
        // As Qwen2.5 writes them.
        let out = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        let p = parse(ToolFormat::Hermes, out);
        assert_eq!(p.content, "");
        assert_eq!(p.calls, vec![call("get_weather", r#"{"city":"Paris"}"#)]);
        let out = "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {\"x\": [1, 2]}}\n</tool_call>";
        let p = parse(ToolFormat::Hermes, out);
        assert_eq!(p.content, "Let me check.");
        assert_eq!(p.calls, vec![call("a", "{}"), call("b", r#"{"x":[1,2]}"#)]);
        // Cut at EOS before the closing tag, JSON whole: still a call.
        let p = parse(
            ToolFormat::Hermes,
            "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}",
        );
        assert_eq!(p.calls, vec![call("a", "{}")]);
    }

    #[test]
    fn malformed_calls_stay_content() {
        for (format, out) in [
            (ToolFormat::Hermes, "<tool_call>\n{\"name\": \"a\", \"argu"),
            (
                ToolFormat::Hermes,
                "<tool_call>{\"arguments\": {}}</tool_call>",
            ),
            (
                ToolFormat::Hermes,
                "<tool_call>{\"name\": \"a\"}</tool_call> and then text",
            ),
            (ToolFormat::Hermes, "no call here"),
            (ToolFormat::Llama3, "The answer is {\"name\": 1}"),
            (ToolFormat::Llama3, "{\"name\": \"a\", \"parameters\": 5}"),
            (ToolFormat::Mistral, "[TOOL_CALLS] [{\"name\": "),
            (ToolFormat::Mistral, "plain text"),
        ] {
            let p = parse(format, out);
            assert!(p.calls.is_empty(), "{out}");
            assert_eq!(p.content, out);
        }
    }

    #[test]
    fn llama3_json_calls_bare_after_the_python_tag_and_joined() {
        let p = parse(
            ToolFormat::Llama3,
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
        );
        assert_eq!(p.calls, vec![call("get_weather", r#"{"city":"Oslo"}"#)]);
        let p = parse(
            ToolFormat::Llama3,
            "<|python_tag|>{\"name\": \"f\", \"parameters\": {}}",
        );
        assert_eq!(p.calls, vec![call("f", "{}")]);
        let p = parse(
            ToolFormat::Llama3,
            "{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {\"a\": 1}}",
        );
        assert_eq!(p.calls, vec![call("f", "{}"), call("g", r#"{"a":1}"#)]);
    }

    #[test]
    fn mistral_calls_in_both_tokenizer_generations() {
        let p = parse(
            ToolFormat::Mistral,
            "[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]",
        );
        assert_eq!(p.calls, vec![call("get_weather", r#"{"city":"Rome"}"#)]);
        let p = parse(
            ToolFormat::Mistral,
            "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Rome\"}[TOOL_CALLS]f[ARGS]{}",
        );
        assert_eq!(
            p.calls,
            vec![call("get_weather", r#"{"city":"Rome"}"#), call("f", "{}")]
        );
    }

    #[test]
    fn a_call_start_is_found_where_streaming_must_hold_text() {
        assert_eq!(
            call_start(ToolFormat::Hermes, "Sure. <tool_call>", true),
            Some(6)
        );
        assert_eq!(call_start(ToolFormat::Hermes, "Sure.", true), None);
        assert_eq!(call_start(ToolFormat::Llama3, "  {\"name\"", true), Some(0));
        assert_eq!(call_start(ToolFormat::Llama3, "{\"name\"", false), None);
        assert_eq!(call_start(ToolFormat::Llama3, "x {", true), None);
        assert_eq!(
            call_start(ToolFormat::Mistral, "a[TOOL_CALLS]", true),
            Some(1)
        );
    }
}
