//! The `messages` of a chat request, validated into [`ChatMessage`]s:
//! roles, text content parts (joined as vLLM joins them), and the tool
//! fields (`tool_calls`, `tool_call_id`) of OpenAI's messages.

use serde_json::{Map, Value};

use crate::proxy::request::{invalid, typed_at, RequestError};
use crate::template::ChatMessage;

pub(crate) fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, RequestError> {
    let Some(Value::Array(items)) = v else {
        return Err(invalid("messages", "messages must be a non-empty array"));
    };
    if items.is_empty() {
        return Err(invalid("messages", "messages must be a non-empty array"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect()
}

fn parse_message(i: usize, m: &Value) -> Result<ChatMessage, RequestError> {
    let param = format!("messages[{i}]");
    let Value::Object(m) = m else {
        return Err(invalid(&param, "each message must be an object"));
    };
    // Fields an SDK echoes back from an answer (`refusal: null`, ...) are
    // fine while they say nothing.
    if let Some((k, _)) = m.iter().find(|(k, v)| {
        !["role", "content", "name", "tool_calls", "tool_call_id"].contains(&k.as_str())
            && !v.is_null()
    }) {
        return Err(invalid(
            &format!("{param}.{k}"),
            format!("unsupported message field: {k}"),
        ));
    }
    let role = match m.get("role").and_then(Value::as_str) {
        Some(r @ ("system" | "user" | "assistant" | "tool")) => r,
        // OpenAI's newer name for the system role.
        Some("developer") => "system",
        Some(other) => {
            return Err(invalid(
                &format!("{param}.role"),
                format!(
                    "unsupported role {other:?}: use system, developer, user, assistant or tool"
                ),
            ))
        }
        None => return Err(invalid(&format!("{param}.role"), "role must be a string")),
    };
    let has_calls = role == "assistant" && m.get("tool_calls").is_some_and(|c| !c.is_null());
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) if role == "assistant" => String::new(),
        Some(Value::Array(parts)) => text_parts(&param, parts)?,
        _ => {
            return Err(invalid(
                &format!("{param}.content"),
                "content must be a string or an array of text parts",
            ))
        }
    };
    let mut message = ChatMessage::new(role, &content);
    message.name = optional_string(m, &param, "name")?;
    message.tool_call_id = optional_string(m, &param, "tool_call_id")?;
    match (role, &message.tool_call_id) {
        ("tool", None) => {
            return Err(invalid(
                &format!("{param}.tool_call_id"),
                "a tool message needs the tool_call_id it answers",
            ))
        }
        ("tool", Some(_)) | (_, None) => {}
        (_, Some(_)) => {
            return Err(invalid(
                &format!("{param}.tool_call_id"),
                "only a tool message has a tool_call_id",
            ))
        }
    }
    if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
        if !has_calls {
            return Err(invalid(
                &format!("{param}.tool_calls"),
                "only an assistant message has tool_calls",
            ));
        }
        message.tool_calls = tool_calls(&format!("{param}.tool_calls"), calls)?;
    }
    Ok(message)
}

/// A string field of a message, if present.
fn optional_string(
    m: &Map<String, Value>,
    param: &str,
    key: &str,
) -> Result<Option<String>, RequestError> {
    typed_at(m, key, &format!("{param}.{key}"), "a string")
}

/// An assistant message's `tool_calls`, with each call's `arguments` (JSON
/// text in OpenAI's API) read into the object templates expect.
fn tool_calls(param: &str, v: &Value) -> Result<Vec<Value>, RequestError> {
    let Value::Array(calls) = v else {
        return Err(invalid(param, "tool_calls must be a non-empty array"));
    };
    if calls.is_empty() {
        return Err(invalid(param, "tool_calls must be a non-empty array"));
    }
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = format!("{param}[{i}]");
            let f = c
                .get("function")
                .filter(|_| {
                    c.get("type").and_then(Value::as_str).unwrap_or("function") == "function"
                })
                .ok_or_else(|| {
                    invalid(
                        &p,
                        "a tool call is {\"type\": \"function\", \"function\": {...}}",
                    )
                })?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| {
                invalid(
                    &format!("{p}.function.name"),
                    "a call needs a function name",
                )
            })?;
            let arguments = match f.get("arguments") {
                Some(Value::String(s)) => serde_json::from_str::<Map<String, Value>>(s)
                    .map(Value::Object)
                    .map_err(|_| {
                        invalid(
                            &format!("{p}.function.arguments"),
                            "arguments must be a JSON object, as text",
                        )
                    })?,
                Some(o @ Value::Object(_)) => o.clone(),
                _ => {
                    return Err(invalid(
                        &format!("{p}.function.arguments"),
                        "arguments must be a JSON object, as text",
                    ))
                }
            };
            let id = c.get("id").and_then(Value::as_str).unwrap_or_default();
            Ok(serde_json::json!({"id": id, "type": "function",
                                  "function": {"name": name, "arguments": arguments}}))
        })
        .collect()
}

/// Text content parts, joined with newlines as vLLM does.
fn text_parts(param: &str, parts: &[Value]) -> Result<String, RequestError> {
    let texts = parts
        .iter()
        .map(
            |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                (Some(kind), _) if kind != "text" => Err(invalid(
                    &format!("{param}.content"),
                    format!("content parts of type {kind:?} are not supported; only text"),
                )),
                _ => Err(invalid(
                    &format!("{param}.content"),
                    "a text part needs {\"type\":\"text\",\"text\":\"...\"}",
                )),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    Ok(texts.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An OpenAI tool round trip becomes what chat templates are given (and
    /// what `tests/tests/chat_templates.rs` renders against jinja2): the
    /// call's `arguments` an object, the result's `tool_call_id` kept.
    #[test]
    fn a_tool_round_trip_takes_the_shape_templates_read() {
        let openai = json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "abc", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "abc", "name": "get_weather", "content": "sunny"},
        ]);
        let messages = parse_messages(Some(&openai)).unwrap();
        let shown: Vec<Value> = messages
            .iter()
            .map(|m| serde_json::to_value(m).unwrap())
            .collect();
        assert_eq!(
            shown,
            vec![
                json!({"role": "user", "content": "Weather in Paris?"}),
                json!({"role": "assistant", "content": "", "tool_calls": [{"id": "abc",
                    "type": "function", "function": {"name": "get_weather",
                    "arguments": {"city": "Paris"}}}]}),
                json!({"role": "tool", "content": "sunny", "tool_call_id": "abc",
                       "name": "get_weather"}),
            ]
        );
    }
}
