use super::*;
use crate::model_tool::{encrypt_model, KeySource};
use crate::template::ChatFormat;
use ee_engine::testing::{write_tiny_model, TinySpec};
use serde_json::json;

pub(crate) fn tiny_keys() -> (tempfile::TempDir, KeyHolder) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_model(&model, &TinySpec::llama_q4_1()).unwrap();
    let bundle = dir.path().join("bundle");
    encrypt_model(
        &model,
        &dir.path().join("s.gguf"),
        &bundle,
        &KeySource::Generate,
        &mut |_, _| {},
    )
    .unwrap();
    let keys = KeyHolder::load(&bundle, ChatFormat::LlamaCpp).unwrap();
    (dir, keys)
}

fn body(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn a_chat_becomes_one_encrypted_message_with_encrypted_stops_and_bias() {
    let (_dir, keys) = tiny_keys();
    let t = translate(
        &keys,
        Endpoint::Chat,
        &body(json!({"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "temperature": 0.5, "n": 2, "stop": "END", "logit_bias": {"5": -3}, "stop_token_ids": [4],
            "cache_prompt": true})),
    )
    .unwrap();
    let up = serde_json::to_value(&t.upstream).unwrap();
    assert_eq!(up["temperature"], json!(0.5));
    assert_eq!(up["stream"], json!(true));
    assert_eq!(up["cache_prompt"], json!(true));
    let messages = up["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1);
    let sent: Vec<u32> =
        serde_json::from_value(messages[0]["content"][0]["token_ids"].clone()).unwrap();
    let plain = keys.decrypt(&sent).unwrap();
    let text = keys.codec().decode(&plain).unwrap();
    assert!(text.contains("be brief") && text.contains("hi"), "{text}");
    assert_eq!(t.prompt_tokens, sent.len());
    assert_eq!(t.choices, 2);
    assert_eq!(t.stops, vec!["END".to_string()]);
    let stops: Vec<u32> = serde_json::from_value(up["stop_token_ids"].clone()).unwrap();
    let mut plain_stops = keys.decrypt(&stops).unwrap();
    plain_stops.sort_unstable();
    let mut expected = keys.stop_ids().to_vec();
    expected.push(4);
    expected.sort_unstable();
    assert_eq!(plain_stops, expected);
    let bias = up["logit_bias"].as_object().unwrap();
    let cipher: u32 = bias.keys().next().unwrap().parse().unwrap();
    assert_eq!(keys.decrypt(&[cipher]).unwrap(), vec![5]);
    assert!(!t.stream && !t.include_usage && !t.trace);
}

#[test]
fn completion_prompts_take_text_texts_and_token_ids() {
    let (_dir, keys) = tiny_keys();
    for (prompt, n) in [
        (json!("hello"), 1),
        (json!(["a", "b c"]), 2),
        (json!([3, 4]), 1),
        (json!([[3], [4, 5]]), 2),
    ] {
        let t = translate(
            &keys,
            Endpoint::Completion,
            &body(json!({"prompt": prompt, "logprobs": 1})),
        )
        .unwrap();
        assert_eq!(t.encrypted_prompts.len(), n, "{prompt}");
        let up = serde_json::to_value(&t.upstream).unwrap();
        assert_eq!(up["prompt"], json!(t.encrypted_prompts));
        assert_eq!(t.logprobs, LogprobsShape::Completion);
    }
    let ids = translate(
        &keys,
        Endpoint::Completion,
        &body(json!({"prompt": [3, 4]})),
    )
    .unwrap();
    assert_eq!(keys.decrypt(&ids.encrypted_prompts[0]).unwrap(), vec![3, 4]);
}

#[test]
fn fields_frameworks_send_by_default_are_accepted_and_not_forwarded() {
    let (_dir, keys) = tiny_keys();
    let t = translate(
        &keys,
        Endpoint::Chat,
        &body(json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "text"}, "tool_choice": "none", "parallel_tool_calls": true,
            "store": false, "metadata": {"k": "v"}, "service_tier": "auto", "user": "u"})),
    )
    .unwrap();
    let up = serde_json::to_value(&t.upstream).unwrap();
    for k in [
        "response_format",
        "tool_choice",
        "store",
        "metadata",
        "service_tier",
    ] {
        assert!(up.get(k).is_none(), "{k} forwarded");
    }
}

#[test]
fn a_tool_conversation_renders_calls_and_results_for_a_template_without_tools() {
    let (_dir, keys) = tiny_keys();
    let t = translate(
        &keys,
        Endpoint::Chat,
        &body(json!({"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}]})),
    )
    .unwrap();
    assert_eq!(
        t.tool_calls.as_ref().map(|p| p.format),
        Some(crate::tools::ToolFormat::Hermes)
    );
    assert!(t.constraint.is_none(), "auto forces nothing");
    let plain = keys.decrypt(&t.encrypted_prompts[0]).unwrap();
    let text = keys.codec().decode_with_specials(&plain).unwrap();
    for part in [
        "<tools>",
        "\"get_weather\"",
        "<tool_call>\n{\"name\": \"get_weather\"",
        "\"city\": \"Oslo\"",
        "<tool_response>\nsunny\n</tool_response>",
    ] {
        assert!(text.contains(part), "{part:?} missing from {text:?}");
    }
    let forced = translate(
        &keys,
        Endpoint::Chat,
        &body(
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ),
    )
    .unwrap();
    assert!(forced.constraint.is_some());
    let none = translate(
        &keys,
        Endpoint::Chat,
        &body(
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "none",
            "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ),
    )
    .unwrap();
    assert_eq!(none.tool_calls, None, "none: calls are not parsed");
    // Tool turns without tools are still rendered as tool turns.
    let bare = translate(
        &keys,
        Endpoint::Chat,
        &body(json!({"messages": [
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "r1"},
            {"role": "tool", "tool_call_id": "c2", "content": "r2"}]})),
    )
    .unwrap();
    let text = keys
        .codec()
        .decode_with_specials(&keys.decrypt(&bare.encrypted_prompts[0]).unwrap())
        .unwrap();
    assert!(!text.contains("<tools>"), "no tools, no offer: {text:?}");
    assert!(text.contains("<tool_call>\n{\"name\": \"f\""), "{text:?}");
    // Two results in a row are one user turn.
    assert!(
        text.contains(
            "<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>"
        ),
        "{text:?}"
    );
}

#[test]
fn bad_requests_name_their_parameter() {
    let (_dir, keys) = tiny_keys();
    let vocab = keys.vocab_size();
    let cases = [
        (Endpoint::Chat, json!({"messages": "hi"}), "messages"),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "functions": []}),
            "functions",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
            "stream",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "cache_prompt": 1}),
            "cache_prompt",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "stream": true, "stream_options": []}),
            "stream_options",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "stop": vec!["s"; MAX_STOPS + 1]}),
            "stop",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [vocab]}),
            "stop_token_ids",
        ),
        (Endpoint::Completion, json!({"prompt": []}), "prompt"),
        (Endpoint::Completion, json!({"prompt": ""}), "prompt"),
        (Endpoint::Completion, json!({"prompt": [vocab]}), "prompt"),
        (Endpoint::Completion, json!({"prompt": [1, "a"]}), "prompt"),
        (
            Endpoint::Completion,
            json!({"prompt": "x", "echo": true}),
            "echo",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].tool_call_id",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}),
            "messages[0].tool_call_id",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
            "messages[0].tool_calls",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            Endpoint::Completion,
            json!({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}),
            "tool_choice",
        ),
        (
            Endpoint::Chat,
            json!({"messages": [{"role": "user", "content": "x"}], "store": true}),
            "store",
        ),
        (
            Endpoint::Completion,
            json!({"prompt": "x", "messages": []}),
            "messages",
        ),
    ];
    for (endpoint, request, param) in cases {
        let e = translate(&keys, endpoint, &body(request.clone())).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(param), "{request}: {}", e.message);
    }
}

#[test]
fn a_grammar_forces_its_fixed_text_and_leaves_the_last_token_to_the_model() {
    let (_dir, keys) = tiny_keys();
    let t = translate(
        &keys,
        Endpoint::Chat,
        &body(json!({"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema":
                {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}})),
    )
    .unwrap();
    let mut c = t.constraint.unwrap();
    let forced = c.forced(keys.codec()).unwrap();
    let text = keys.codec().decode(&forced).unwrap();
    assert!(
        !forced.is_empty(),
        "an object with one required key forces its start"
    );
    assert!(
        "{\"name\": \"".starts_with(&text) && text.len() < 10,
        "{text:?}"
    );
    // The mask now allows what completes it, and nothing forced again.
    assert!(c.mask().unwrap().count() >= 1);
    assert_eq!(c.forced(keys.codec()).unwrap(), Vec::<u32>::new());
}
