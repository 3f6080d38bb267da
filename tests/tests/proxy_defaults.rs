//! The proxy's default answer length (`--default-max-tokens`): a request
//! that names no length gets the cap, one that names it gets its own, and
//! the default never overflows the context on its own (the client sent no
//! `max_tokens` to be blamed for it). A tiny random model with a 64-token
//! context keeps the runs short.

use ee_client::model_tool::KeySource;
use ee_e2e::{encrypt, ServerProcess};
use ee_engine::testing::{write_tiny_model, TinySpec};
use serde_json::{json, Value};

const CONTEXT: usize = 64;

/// Completion tokens and finish reason of a `/v1/completions` answer.
fn length_of(proxy: &ServerProcess, body: Value) -> (u64, String) {
    let r = proxy.post_json("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    (
        v["usage"]["completion_tokens"].as_u64().expect("usage"),
        v["choices"][0]["finish_reason"]
            .as_str()
            .expect("finish_reason")
            .to_owned(),
    )
}

#[test]
fn the_proxy_caps_answers_that_name_no_length() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        context_length: CONTEXT,
        ..TinySpec::llama_q4_1()
    };
    write_tiny_model(&model, &spec).unwrap();
    let pair = encrypt(&model, &KeySource::Generate);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let proxy = ServerProcess::proxy_with(
        &pair.bundle.dir,
        &server.url(),
        &["--default-max-tokens", "5"],
    );
    // ignore_eos: the random model must not stop on its own first.
    let ask = |extra: Value| {
        let mut body = json!({"prompt": "the cat", "temperature": 0, "ignore_eos": true});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        length_of(&proxy, body)
    };
    assert_eq!(ask(json!({})), (5, "length".into()));
    assert_eq!(ask(json!({"max_tokens": 7})), (7, "length".into()));
    assert_eq!(
        ask(json!({"max_completion_tokens": 9})),
        (9, "length".into())
    );
    // A 61-token prompt leaves 3 tokens of room: the default shrinks to it
    // rather than overflowing the context with a length nobody asked for.
    let long: Vec<u32> = (0..CONTEXT as u32 - 3).map(|i| 3 + i % 200).collect();
    assert_eq!(ask(json!({"prompt": long})), (3, "length".into()));

    // 0 leaves the length to the server's own default.
    let uncapped = ServerProcess::proxy_with(
        &pair.bundle.dir,
        &server.url(),
        &["--default-max-tokens", "0"],
    );
    let (n, finish) = length_of(
        &uncapped,
        json!({"prompt": "the cat", "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(finish, "length");
    assert!(n > 5, "{n}");
}
