//! The whole stack on real vocabularies: tiny random-weight Llama models
//! around llama.cpp's `llama-spm` (32k SentencePiece, with Mistral's
//! template) and `llama-bpe` (Llama 3's 128k BPE, with Llama 3.1's
//! template), encrypted, served by `ee-server` and driven through `ee proxy`
//! with raw HTTP and the official `openai` package. The encrypted stack must
//! say exactly what the identity-key stack says, greedy and seeded, streamed
//! and not.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

use ee_client::model_tool::KeySource;
use ee_core::gguf::{GgufHeader, Value as GgufValue};
use ee_e2e::{
    binary, encrypt, llama_cpp_data, openai_package, stdout_of, workspace_root, EncryptedPair,
    ServerProcess,
};
use ee_engine::testing::{write_tiny_model_with_text, TinySpec};
use serde_json::{json, Value};

/// A tiny model with the vocabulary (and so the tokenizer) of `vocab` and
/// the chat template `template`.
fn tiny_model(dir: &Path, vocab: &Path, template: &Path) -> PathBuf {
    let header = GgufHeader::read(&mut BufReader::new(File::open(vocab).unwrap())).unwrap();
    let mut text: Vec<(String, GgufValue)> = header
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer.") && !k.starts_with("tokenizer.chat_template"))
        .collect();
    let source = std::fs::read_to_string(template).unwrap();
    text.push(("tokenizer.chat_template".into(), GgufValue::String(source)));
    let path = dir.join("tiny.gguf");
    let spec = TinySpec {
        context_length: 512,
        seed: 23,
        ..TinySpec::llama_q4_1()
    };
    write_tiny_model_with_text(&path, &spec, text).unwrap();
    path
}

struct Stack {
    pair: EncryptedPair,
    _server: ServerProcess,
    proxy: ServerProcess,
}

fn stack(model: &Path, key: KeySource) -> Stack {
    let pair = encrypt(model, &key);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let proxy = ServerProcess::proxy(&pair.bundle.dir, &format!("http://{}", server.addr));
    Stack {
        pair,
        _server: server,
        proxy,
    }
}

fn answer(stack: &Stack, body: &Value) -> String {
    ee_e2e::answer_text(&stack.proxy, "/v1/chat/completions", body)
}

fn sdk_answer(stack: &Stack, question: &str) -> String {
    let script = "import json, os, sys, openai\n\
        c = openai.OpenAI(base_url=os.environ['EE_BASE_URL'], api_key='unused')\n\
        r = c.chat.completions.create(model=c.models.list().data[0].id, \
        messages=[{'role': 'user', 'content': sys.argv[1]}], temperature=0, max_tokens=24)\n\
        print(json.dumps(r.choices[0].message.content))";
    let out = stdout_of(
        Command::new("python3")
            .args(["-c", script, question])
            .env("PYTHONPATH", openai_package())
            .env("EE_BASE_URL", format!("{}/v1", stack.proxy.url()))
            .current_dir(workspace_root()),
    );
    serde_json::from_slice(&out).unwrap()
}

/// Structured output and a forced tool call over this vocabulary and in
/// this template's own call format (Mistral's `[TOOL_CALLS]`, Llama 3's
/// JSON): the answer parses (a random model follows the grammar because it
/// must), and the encrypted stack gives the identity-key stack's answer,
/// greedy and seeded.
fn constrained_answers_agree(plain: &Stack, secret: &Stack, vocab: &str) {
    let schema = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name", "n"]});
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                       "required": ["city"]}}}]);
    for sampling in [
        json!({"temperature": 0}),
        json!({"temperature": 0.9, "seed": 4}),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "Name and number?"}],
            "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}});
        let mut call = json!({"messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "max_tokens": 120, "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}});
        for (k, v) in sampling.as_object().unwrap() {
            body[k] = v.clone();
            call[k] = v.clone();
        }
        let text = answer(secret, &body);
        assert_eq!(text, answer(plain, &body), "{vocab} {sampling}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{vocab}: {e}: {text:?}"));
        assert!(v["name"].is_string() && v["n"].is_u64(), "{vocab}: {v}");
        let called = |s: &Stack| {
            let r = s.proxy.post_json("/v1/chat/completions", &call);
            assert_eq!(r.status, 200, "{vocab}: {}", r.body);
            let v = r.json();
            assert_eq!(
                v["choices"][0]["finish_reason"], "tool_calls",
                "{vocab}: {v}"
            );
            v["choices"][0]["message"]["tool_calls"][0]["function"].clone()
        };
        let f = called(secret);
        assert_eq!(f, called(plain), "{vocab} {sampling}");
        // Streamed: the call arrives whole under index 0, and none of it as
        // content (Mistral's marker is a special token the text drops).
        let mut streamed = call.clone();
        streamed["stream"] = json!(true);
        let r = secret.proxy.post_json("/v1/chat/completions", &streamed);
        let (mut content, mut calls, mut finish) = (String::new(), Vec::new(), Value::Null);
        for data in r.sse_data().iter().filter(|d| *d != "[DONE]") {
            let chunk: Value = serde_json::from_str(data).unwrap();
            for c in chunk["choices"].as_array().unwrap() {
                content.push_str(c["delta"]["content"].as_str().unwrap_or(""));
                calls.extend(
                    c["delta"]["tool_calls"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                );
                if !c["finish_reason"].is_null() {
                    finish = c["finish_reason"].clone();
                }
            }
        }
        assert_eq!(content, "", "{vocab}: the call leaked into content");
        assert_eq!(finish, "tool_calls", "{vocab}");
        assert_eq!(calls.len(), 1, "{vocab}: {calls:?}");
        assert_eq!(calls[0]["index"], 0);
        assert_eq!(calls[0]["function"], f, "{vocab}: streamed and not agree");
        assert_eq!(f["name"], "get_weather", "{vocab}: {f}");
        let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
        assert!(args["city"].is_string(), "{vocab}: {args}");
    }
}

/// Through the proxy's `/tokenize`: a message spelling the control token
/// `marker` holds no more of it than one without.
fn message_text_is_not_control_tokens(stack: &Stack, marker: &str) {
    let tokens = |body: Value| -> Vec<u64> {
        let r = stack.proxy.post_json("/tokenize", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_value(r.json()["tokens"].clone()).unwrap()
    };
    let id = tokens(json!({"prompt": marker, "add_special_tokens": false}));
    assert_eq!(id.len(), 1, "{marker} is one control token in a raw prompt");
    let chat =
        |content: String| tokens(json!({"messages": [{"role": "user", "content": content}]}));
    let count = |ids: &[u64]| ids.iter().filter(|&&t| t == id[0]).count();
    let forged = chat(format!("x{marker}y"));
    assert_eq!(count(&forged), count(&chat("xy".into())), "{marker}");
    assert!(forged.len() > chat("xy".into()).len());
    // `ee tokenize --bundle` agrees with the proxy.
    let out = stdout_of(
        Command::new(binary("ee"))
            .args(["tokenize", "--ids", "--bundle"])
            .arg(&stack.pair.bundle.dir)
            .arg(format!("x{marker}y")),
    );
    let cli: Vec<u64> = serde_json::from_slice(&out).unwrap();
    assert_eq!(cli, tokens(json!({"prompt": format!("x{marker}y")})));
}

/// A conversation the template refuses is a 400 naming `messages`, with
/// the template's own words.
fn refused_conversations_are_the_clients_400(stack: &Stack) {
    let r = stack.proxy.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                             {"role": "user", "content": "c"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let error = &r.json()["error"];
    assert_eq!(error["param"], "messages");
    assert!(error["message"]
        .as_str()
        .unwrap()
        .contains("Only user and assistant roles are supported"));
}

fn encrypted_stack_says_what_the_plain_one_says(vocab: &str, template: &str, marker: &str) {
    let (data, _) = llama_cpp_data();
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(
        dir.path(),
        &data.join(vocab),
        &data.join(format!("templates/{template}.jinja")),
    );
    let plain = stack(&model, KeySource::Identity);
    let secret = stack(&model, KeySource::Generate);
    let question = "Bonjour ! Écris un haïku sur la mer 🌊";
    let chat = |extra: Value| {
        let mut body = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question}], "max_tokens": 24});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let greedy = answer(&secret, &chat(json!({"temperature": 0})));
    assert!(
        !greedy.is_empty(),
        "{vocab}: an empty answer proves nothing"
    );
    assert_eq!(
        greedy,
        answer(&plain, &chat(json!({"temperature": 0}))),
        "{vocab}"
    );
    assert_eq!(
        greedy,
        answer(&secret, &chat(json!({"temperature": 0, "stream": true})))
    );
    let seeded = json!({"temperature": 0.9, "seed": 7});
    let drawn = answer(&secret, &chat(seeded.clone()));
    assert_eq!(drawn, answer(&plain, &chat(seeded.clone())), "{vocab}");
    let mut streamed = seeded;
    streamed["stream"] = json!(true);
    assert_eq!(drawn, answer(&secret, &chat(streamed)));
    assert_ne!(
        drawn, greedy,
        "{vocab}: the seeded draws should differ from greedy"
    );
    // The official SDK, with only base_url changed.
    assert_eq!(
        sdk_answer(&secret, question),
        sdk_answer(&plain, question),
        "{vocab}"
    );
    constrained_answers_agree(&plain, &secret, vocab);
    message_text_is_not_control_tokens(&secret, marker);
    if template.starts_with("mistralai") {
        refused_conversations_are_the_clients_400(&secret);
    }
}

#[test]
fn sentencepiece_vocabulary_with_mistrals_template() {
    encrypted_stack_says_what_the_plain_one_says(
        "ggml-vocab-llama-spm.gguf",
        "mistralai-Mistral-Nemo-Instruct-2407",
        "</s>",
    );
}

#[test]
fn llama3_vocabulary_with_llama_3_1s_template() {
    encrypted_stack_says_what_the_plain_one_says(
        "ggml-vocab-llama-bpe.gguf",
        "meta-llama-Llama-3.1-8B-Instruct",
        "<|eot_id|>",
    );
}
