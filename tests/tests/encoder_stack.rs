//! The encrypted encoder stack end to end, as processes on loopback: the
//! blind server on an encoder artifact, the proxy with its bundle, and the
//! official `openai` SDK's `embeddings.create` with only `base_url`
//! changed. Answers equal the plaintext model's within the encoder
//! tolerance, and the captured server traffic holds neither the text, nor
//! its plaintext token IDs, nor the embeddings in the user's coordinates.

use std::path::Path;

use ee_client::model_tool::KeySource;
use ee_e2e::{encoder_path, encrypt, RecordingRelay, ServerProcess};
use ee_engine::testing::encoder::{write_tiny_encoder, TinyEncoderKind, TinyEncoderSpec};
use ee_engine::ModelFiles;
use serde_json::{json, Value};

const TEXTS: [&str; 3] = [
    "a cat sits on the mat",
    "a kitten rests on the rug",
    "The stock market fell sharply on Tuesday.",
];

fn plaintext_ids(dir: &Path, text: &str) -> Vec<u32> {
    let mut t = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    t.with_padding(None);
    t.with_truncation(None).unwrap();
    t.encode(text, true).unwrap().get_ids().to_vec()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum::<f64>()
    };
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(got: &[f32], expected: &[f32]) {
    let abs = got
        .iter()
        .zip(expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        abs <= 1e-5 && cosine(got, expected) >= 0.999999,
        "max |Δ| {abs}"
    );
}

#[test]
fn sdk_embeddings_through_the_proxy_equal_the_plaintext_model_and_stay_off_the_wire() {
    let dir = encoder_path();
    let pair = encrypt(&dir, &KeySource::Generate);
    assert!(pair.bundle.manifest.encoder.is_some());
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let relay = RecordingRelay::start(server.addr);
    let proxy = ServerProcess::proxy(&pair.bundle.dir, &relay.url());

    let plain = ModelFiles::open(&dir).unwrap().load_encoder().unwrap();
    let ids: Vec<Vec<u32>> = TEXTS.iter().map(|t| plaintext_ids(&dir, t)).collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let expected = plain.embed(&refs).unwrap();

    let texts = serde_json::to_string(&TEXTS).unwrap();
    let r = ee_e2e::run_openai_script(
        "openai_embeddings.py",
        &proxy.url(),
        &[("EE_TEXTS", &texts)],
    );
    assert_eq!(r["indices"], json!([0, 1, 2]));
    assert_eq!(r["model"], "ee-model");
    assert_eq!(r["usage"], json!(ids.iter().map(Vec::len).sum::<usize>()));
    let got: Vec<Vec<f32>> = r["batch"].as_array().unwrap().iter().map(floats).collect();
    for (g, e) in got.iter().zip(&expected) {
        assert_close(g, e);
    }
    assert_close(&floats(&r["one"]), &expected[0]);
    assert_eq!(
        r["dimensions_error"],
        json!({"status": 400, "param": "dimensions"})
    );
    // The paraphrases rank as the plaintext model ranks them.
    let order = |v: &[Vec<f32>]| cosine(&v[0], &v[1]) > cosine(&v[0], &v[2]);
    assert!(order(&expected) && order(&got));

    let capture = String::from_utf8_lossy(&relay.captured()).to_lowercase();
    assert!(
        capture.contains("/v1/embeddings"),
        "the relay saw the traffic"
    );
    // Whole words of the inputs ("cat" would match "application").
    for word in ["kitten", "stock", "sits", "rests", "tuesday"] {
        assert!(!capture.contains(word), "{word:?} crossed the wire");
    }
    let plain_ids = ids[0]
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        !capture.contains(&plain_ids),
        "plaintext IDs crossed the wire"
    );
    // The served vectors are permuted: no run of the plaintext embedding's
    // leading values appears as it is in the user's coordinates.
    let leading = serde_json::to_string(&got[0][..3]).unwrap();
    let leading = leading.trim_matches(['[', ']']);
    assert!(
        !capture.contains(leading),
        "a plaintext vector crossed the wire"
    );
}

#[test]
fn proxy_refuses_bad_embedding_requests_by_name_and_truncates_when_asked() {
    let pair = encrypt(&encoder_path(), &KeySource::Generate);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let proxy = ServerProcess::proxy(&pair.bundle.dir, &format!("http://{}", server.addr));
    let long = "word ".repeat(600);
    for (body, param, code) in [
        (
            json!({"input": long}),
            json!("input"),
            Some("context_length_exceeded"),
        ),
        (json!({"input": []}), json!("input"), None),
        (json!({"input": [["x"]]}), json!("input"), None),
        (json!({"input": [1, 99999]}), json!("input"), None),
        (
            json!({"input": "x", "encoding_format": "hex"}),
            json!("encoding_format"),
            None,
        ),
        (
            json!({"input": "x", "truncate_prompt_tokens": 2}),
            json!("truncate_prompt_tokens"),
            None,
        ),
        (json!({"input": "x", "stream": true}), json!("stream"), None),
        (
            json!({"input": "x", "dimensions": 10}),
            json!("dimensions"),
            None,
        ),
        // OpenAI's own model_not_found names no param.
        (
            json!({"input": "x", "model": "other"}),
            Value::Null,
            Some("model_not_found"),
        ),
    ] {
        let r = proxy.post_json("/v1/embeddings", &body);
        assert!(
            r.status == 400 || r.status == 404,
            "{body}: {} {}",
            r.status,
            r.body
        );
        let e: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(e["error"]["param"], param, "{body}: {}", r.body);
        if let Some(code) = code {
            assert_eq!(e["error"]["code"], code, "{}", r.body);
        }
    }
    let r = proxy.post_json(
        "/v1/embeddings",
        &json!({"input": long, "truncate_prompt_tokens": 16}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 16);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 384);
    // The chat endpoints say what this model is.
    let r = proxy.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("encoder"), "{}", r.body);
    // The server counts what it embedded (16 tokens above).
    let metrics = ee_e2e::http_request(server.addr, "GET", "/metrics", &[], b"").unwrap();
    assert!(
        metrics.body.contains("ee_prompt_tokens_total 16"),
        "{}",
        metrics.body
    );
    // The server's own refusals, to a client without the key.
    let r = server.post_json("/v1/embeddings", &json!({"input": "text"}));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("token IDs only"), "{}", r.body);
}

#[test]
fn classification_through_the_proxy_names_the_plaintext_label() {
    let model = tempfile::tempdir().unwrap();
    let spec = TinyEncoderSpec::classifier(TinyEncoderKind::DistilBert, 30522);
    write_tiny_encoder(
        model.path(),
        &spec,
        Some(&encoder_path().join("tokenizer.json")),
    )
    .unwrap();
    let pair = encrypt(model.path(), &KeySource::Generate);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let relay = RecordingRelay::start(server.addr);
    let proxy = ServerProcess::proxy(&pair.bundle.dir, &relay.url());

    let plain = ModelFiles::open(model.path())
        .unwrap()
        .load_encoder()
        .unwrap();
    let ids: Vec<Vec<u32>> = TEXTS
        .iter()
        .map(|t| plaintext_ids(model.path(), t))
        .collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let expected = plain.classify(&refs).unwrap();

    let r = proxy.post_json("/classify", &json!({"model": "ee-model", "input": TEXTS}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    for (item, e) in v["data"].as_array().unwrap().iter().zip(&expected) {
        let probs = floats(&item["probs"]);
        let d = probs
            .iter()
            .zip(e)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(d <= 1e-6, "probabilities differ by {d}");
        let best = (0..3).max_by(|&a, &b| e[a].total_cmp(&e[b])).unwrap();
        assert_eq!(item["label"], spec.labels[best]);
        assert_eq!(item["num_classes"], 3);
    }
    let capture = String::from_utf8_lossy(&relay.captured()).to_lowercase();
    assert!(capture.contains("/classify"));
    for name in &spec.labels {
        assert!(!capture.contains(name.as_str()), "{name} crossed the wire");
    }
}
