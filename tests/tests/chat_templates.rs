//! Chat templates render byte for byte as transformers renders them: the
//! real templates llama.cpp collects (`models/templates/*.jinja`, from the
//! llama-cpp-python sdist), on conversations with and without a system
//! message, several turns, a final assistant message to continue, tools and
//! a tool round trip, compared with Python's jinja2 set up as transformers'
//! `apply_chat_template` (`tests/py/render_templates.py`).

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use ee_client::template::{ChatInput, ChatTemplate};
use ee_client::Error;
use ee_e2e::{llama_cpp_data, workspace_root};
use serde_json::{json, Value};

/// The templates the issue names: Llama 3.x, Mistral / Devstral /
/// Ministral, Hermes, DeepSeek-R1-Distill-Llama, Qwen2.5, SmolLM3, Phi-3.5,
/// Gemma-2 and Granite. Each must agree on every conversation.
const REQUIRED: [&str; 17] = [
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "mistralai-Ministral-3-14B-Reasoning-2512",
    "unsloth-mistral-Devstral-Small-2507",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "Qwen-Qwen2.5-7B-Instruct",
    "HuggingFaceTB-SmolLM3-3B",
    "microsoft-Phi-3.5-mini-instruct",
    "google-gemma-2-2b-it",
    "ibm-granite-granite-3.3-2B-Instruct",
    "ibm-granite-granite-4.0",
    "ibm-granite-granite-4.1",
];

/// Templates where we knowingly differ, on the tools conversation only:
/// jinja2 fails on `map(...) | tojson` (a generator), which we render; and
/// functionary concatenates `Markup` with text, which jinja2 HTML-escapes.
const KNOWN_DIFFERENCES: [&str; 2] = ["llama-cpp-deepseek-r1", "meetkai-functionary-medium-v3.1"];

fn tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["city"]
            }
        }
    }])
}

/// The conversations every template renders: (name, messages, tools,
/// add_generation_prompt).
fn conversations() -> Vec<(&'static str, Value, Option<Value>, bool)> {
    let user = json!({"role": "user", "content": "Hello! What's 2+2? Réponds en français 🙂"});
    let system = json!({"role": "system", "content": "You are a terse assistant."});
    let assistant = json!({"role": "assistant", "content": "Quatre."});
    let follow_up = json!({"role": "user", "content": "And 3+3?"});
    let call = json!({"role": "assistant", "content": "", "tool_calls": [{
        "id": "abc123XYZ", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
    }]});
    let result = json!({"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather",
                        "content": "{\"temperature\": 21, \"sky\": \"clear\"}"});
    let weather = json!({"role": "user", "content": "Weather in Paris?"});
    vec![
        ("user only", json!([user]), None, true),
        ("system and user", json!([system, user]), None, true),
        (
            "several turns",
            json!([system, user, assistant, follow_up]),
            None,
            true,
        ),
        (
            "without a generation prompt",
            json!([user, assistant]),
            None,
            false,
        ),
        (
            "an assistant message to continue",
            json!([user, {"role": "assistant", "content": "Quatre, et"}]),
            None,
            false,
        ),
        ("tools offered", json!([weather]), Some(tools()), true),
        (
            "a tool round trip",
            json!([weather, call, result]),
            Some(tools()),
            true,
        ),
        (
            "a system message out of place",
            json!([user, system, follow_up]),
            None,
            true,
        ),
    ]
}

const BOS: &str = "<s>";
const EOS: &str = "</s>";

fn context(messages: &Value, tools: &Option<Value>, add_generation_prompt: bool) -> Value {
    let mut ctx = json!({"messages": messages, "add_generation_prompt": add_generation_prompt,
                         "bos_token": BOS, "eos_token": EOS});
    if let Some(t) = tools {
        ctx["tools"] = t.clone();
    }
    ctx
}

/// Where our rendering and jinja2's part, for the report.
fn difference(ours: &Result<String, Error>, want: &Value) -> String {
    match (ours, want["text"].as_str()) {
        (Ok(a), Some(b)) => {
            let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
            let at = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            let window = |s: &[char]| -> String {
                s[at.saturating_sub(40).min(s.len())..(at + 40).min(s.len())]
                    .iter()
                    .collect()
            };
            format!(
                "from character {at}: ours {:?}, jinja2 {:?}",
                window(&a),
                window(&b)
            )
        }
        _ => format!("ours {ours:?}, jinja2 {want}"),
    }
}

#[test]
fn real_templates_render_byte_identically_to_jinja2() {
    let (data, python) = llama_cpp_data();
    let mut templates = BTreeMap::new();
    for entry in std::fs::read_dir(data.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "jinja") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            templates.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
    for name in REQUIRED {
        assert!(templates.contains_key(name), "{name}.jinja is missing");
    }
    let convs = conversations();
    let cases: Vec<Value> = convs.iter().map(|(_, m, t, g)| context(m, t, *g)).collect();
    let request = json!({"templates": templates, "cases": cases});
    let mut child = Command::new(&python)
        .arg(workspace_root().join("tests/py/render_templates.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the jinja2 oracle");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the oracle failed");
    let oracle: Value = serde_json::from_slice(&out.stdout).unwrap();

    let mut failures = Vec::new();
    let mut table = Vec::new();
    for (name, source) in &templates {
        let expected = &oracle[name];
        let ours = ChatTemplate::new(source, Some(BOS), Some(EOS));
        let mut agreed = 0;
        let mut first_miss = None;
        let total = convs.len();
        match (ours, expected.get("compile_error")) {
            (Err(e), _) => failures.push(format!("{name}: does not compile: {e}")),
            (Ok(_), Some(e)) => failures.push(format!("{name}: compiles, jinja2 says {e}")),
            (Ok(template), None) => {
                for (i, (case, messages, tools, gen)) in convs.iter().enumerate() {
                    let input = ChatInput {
                        messages: messages.as_array().unwrap().clone(),
                        tools: tools.clone(),
                        add_generation_prompt: *gen,
                        ..ChatInput::default()
                    };
                    let got = template.render_input(&input);
                    let want = &expected[i];
                    let same = match &got {
                        Ok(text) => want["text"].as_str() == Some(text.as_str()),
                        Err(Error::TemplateRaised(msg)) => {
                            want["raised"].as_str() == Some(msg.as_str())
                        }
                        // jinja2 failed on a template bug (not a raise):
                        // we must fail too.
                        Err(_) => want.get("failed").is_some(),
                    };
                    if same {
                        agreed += 1;
                    } else if !KNOWN_DIFFERENCES.contains(&name.as_str()) {
                        failures.push(format!(
                            "{name} / {case}:\n  ours:   {got:?}\n  jinja2: {want}"
                        ));
                    } else if first_miss.is_none() {
                        first_miss = Some(format!("{case}: {}", difference(&got, want)));
                    }
                }
            }
        }
        // Not vacuous: jinja2 renders at least the plain conversation.
        if REQUIRED.contains(&name.as_str()) && expected[0].get("text").is_none() {
            failures.push(format!(
                "{name}: jinja2 did not render a plain user message"
            ));
        }
        table.push(format!("| {name} | {agreed}/{total} |"));
        if let Some(miss) = first_miss {
            println!("{name}: {}", miss.chars().take(600).collect::<String>());
        }
    }
    println!("{}", table.join("\n"));
    assert!(templates.len() >= 70, "only {} templates", templates.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
