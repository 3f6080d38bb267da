//! The blind server as a real process on a loopback port, with the real
//! model encrypted under a fresh key.

use std::time::{Duration, Instant};

use ee_client::model_tool::KeySource;
use ee_client::template::{ChatMessage, ChatTemplate};
use ee_client::text::TextCodec;
use ee_core::Permutation;
use ee_e2e::{encrypt_real_model, http_request, model_path, EncryptedPair, ServerProcess};
use ee_engine::{generate, GenerateOptions};
use serde_json::{json, Value};

struct Stack {
    pair: EncryptedPair,
    perm: Permutation,
    server: ServerProcess,
}

fn stack(env: &[(&str, &str)]) -> Stack {
    let pair = encrypt_real_model(&KeySource::Generate);
    let perm = pair
        .bundle
        .key
        .vocab_permutation(pair.bundle.manifest.vocab_size);
    let server = ServerProcess::start(&pair.server_artifact, env);
    Stack { pair, perm, server }
}

impl Stack {
    /// The chat prompt for `question`, in plaintext IDs.
    fn prompt(&self, question: &str) -> Vec<u32> {
        let m = &self.pair.bundle.manifest;
        let st = &m.special_tokens;
        let codec = TextCodec::from_file(&self.pair.bundle.tokenizer_path(), st.bos_id, st.add_bos)
            .unwrap();
        let template = ChatTemplate::new(
            m.chat_template.as_deref().unwrap(),
            st.bos.as_deref(),
            st.eos.as_deref(),
        )
        .unwrap();
        codec
            .encode(
                &template
                    .render(&[ChatMessage::new("user", question)], true)
                    .unwrap(),
            )
            .unwrap()
    }

    fn enc(&self, ids: &[u32]) -> Vec<u32> {
        self.perm.encrypt_all(ids).unwrap()
    }

    fn dec(&self, v: &Value) -> Vec<u32> {
        let ids: Vec<u32> = serde_json::from_value(v.clone()).unwrap();
        self.perm.decrypt_all(&ids).unwrap()
    }

    fn stop_ids(&self) -> Vec<u32> {
        self.enc(&self.pair.bundle.manifest.special_tokens.stop_ids)
    }

    fn chat(&self, prompt: &[u32], extra: Value) -> Value {
        let mut body = json!({"messages": [{"role": "user", "content": [{"type": "token_ids", "token_ids": self.enc(prompt)}]}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = self.server.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    }
}

/// A client error: 4xx with OpenAI's envelope.
fn assert_envelope(status: u16, body: &str, what: &str) {
    assert!(
        (400..500).contains(&status),
        "{what}: status {status}: {body}"
    );
    assert_envelope_shape(body, what);
}

fn assert_envelope_shape(body: &str, what: &str) {
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("{what}: not JSON: {body}"));
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(e.contains_key(key), "{what}: envelope lacks {key}: {body}");
    }
    assert!(
        !e["message"].as_str().unwrap_or("").is_empty(),
        "{what}: empty message"
    );
}

#[test]
fn greedy_answers_through_the_server_decrypt_to_the_plaintext_models() {
    let s = stack(&[]);
    let models = s
        .server
        .request("GET", "/v1/models", &[], "")
        .unwrap()
        .json();
    assert_eq!(
        models["data"][0]["artifact_sha256"],
        s.pair.bundle.manifest.server_artifact.sha256.as_str()
    );

    let plain = ee_engine::load(&model_path()).unwrap();
    let prompt = s.prompt("What is the capital of France?");
    let stops = s.pair.bundle.manifest.special_tokens.stop_ids.clone();
    let local = generate(
        plain.as_ref(),
        &prompt,
        &GenerateOptions {
            max_tokens: 24,
            stop_token_ids: stops,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();

    let v = s.chat(
        &prompt,
        json!({"temperature": 0, "max_tokens": 24, "stop_token_ids": s.stop_ids()}),
    );
    assert_eq!(
        s.dec(&v["choices"][0]["message"]["token_ids"]),
        local.token_ids()
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], local.tokens.len());

    // The same through /v1/completions, streamed.
    let body = json!({"prompt": s.enc(&prompt), "temperature": 0, "max_tokens": 24, "stop_token_ids": s.stop_ids(),
        "stream": true, "stream_options": {"include_usage": true}});
    let r = s.server.post_json("/v1/completions", &body);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: Vec<u32> = chunks
        .iter()
        .flat_map(|c| {
            c["choices"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|ch| s.dec(&ch["token_ids"]))
        })
        .collect();
    assert_eq!(streamed, local.token_ids());
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        local.tokens.len()
    );
    let finish: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .map(|ch| &ch["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    let want = match local.finish_reason {
        ee_engine::FinishReason::Stop => "stop",
        ee_engine::FinishReason::Length => "length",
    };
    assert_eq!(finish, vec![&json!(want)]);
}

#[test]
fn n_choices_seeds_stop_tokens_and_logprobs() {
    let s = stack(&[]);
    let prompt = s.prompt("Tell me a story.");
    let sampled = |seed: u64| {
        s.chat(
            &prompt,
            json!({"temperature": 0.9, "seed": seed, "n": 3, "max_tokens": 8}),
        )
    };
    let a = sampled(11);
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(
        a["choices"],
        sampled(11)["choices"],
        "same seed, same choices"
    );
    assert_ne!(a["choices"], sampled(12)["choices"]);

    let free = s.chat(&prompt, json!({"temperature": 0, "max_tokens": 8}));
    let tokens: Vec<u32> =
        serde_json::from_value(free["choices"][0]["message"]["token_ids"].clone()).unwrap();
    let stop = tokens[3];
    let first = tokens.iter().position(|&t| t == stop).unwrap();
    let stopped = s.chat(
        &prompt,
        json!({"temperature": 0, "max_tokens": 8, "stop_token_ids": [stop]}),
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        stopped["choices"][0]["message"]["token_ids"],
        json!(tokens[..=first])
    );
    assert_eq!(free["choices"][0]["finish_reason"], "length");

    let lp = s.chat(
        &prompt,
        json!({"temperature": 0, "max_tokens": 2, "logprobs": true, "top_logprobs": 3}),
    );
    let first_lp = &lp["choices"][0]["logprobs"]["content"][0];
    assert_eq!(first_lp["top_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(
        first_lp["token_id"], first_lp["top_logprobs"][0]["token_id"],
        "greedy picks the top token"
    );
}

#[test]
fn concurrent_requests_equal_the_same_requests_alone() {
    let s = stack(&[]);
    let prompts: Vec<Vec<u32>> = [
        "Name a fruit.",
        "What is 2+2?",
        "Say hello in French.",
        "Describe the sky.",
        "Who wrote Hamlet?",
    ]
    .iter()
    .map(|q| s.prompt(q))
    .collect();
    let body = |p: &[u32]| json!({"prompt": s.enc(p), "temperature": 0, "max_tokens": 12});
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| {
            s.server.post_json("/v1/completions", &body(p)).json()["choices"][0]["token_ids"]
                .clone()
        })
        .collect();
    let together: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let b = body(p);
                let server = &s.server;
                scope.spawn(move || {
                    server.post_json("/v1/completions", &b).json()["choices"][0]["token_ids"]
                        .clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
}

fn metric(server: &ServerProcess, name: &str) -> f64 {
    let text = server.request("GET", "/metrics", &[], "").unwrap().body;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1.0)
}

#[test]
fn a_client_that_disconnects_frees_its_slot_and_metrics_show_it() {
    use std::io::{Read, Write};
    let s = stack(&[]);
    let body = json!({"prompt": s.enc(&[1, 2, 3]), "max_tokens": 4000, "ignore_eos": true, "stream": true}).to_string();
    let mut conn = std::net::TcpStream::connect(s.server.addr).unwrap();
    write!(conn, "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut buf = [0u8; 2048];
    let n = conn.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&s.server, "ee_running_sequences") != 1.0 {
        assert!(Instant::now() < deadline, "the sequence never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Blocks of 32 positions are granted as the answer grows, not the
    // 3 + 4000 positions (126 blocks) it may fill; the default pool is
    // 4096 MiB of 23,040-byte positions (f16).
    let used = metric(&s.server, "ee_kv_cache_blocks_used");
    assert!((1.0..126.0).contains(&used), "{used} blocks");
    assert_eq!(metric(&s.server, "ee_kv_cache_blocks_total"), 5825.0);
    drop(conn);
    while metric(&s.server, "ee_running_sequences") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned sequence kept its slot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&s.server, "ee_kv_cache_blocks_used"), 0.0);
    let text = s.server.request("GET", "/metrics", &[], "").unwrap().body;
    for name in [
        "ee_requests_total{status=\"200\"}",
        "ee_prompt_tokens_total",
        "ee_completion_tokens_total",
        "ee_queue_depth",
        "ee_preemptions_total 0",
        "ee_time_to_first_token_seconds_bucket",
        "ee_inter_token_latency_seconds_count",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    // Still serving.
    assert_eq!(
        s.server
            .post_json(
                "/v1/completions",
                &json!({"prompt": [5, 6], "max_tokens": 2})
            )
            .status,
        200
    );
}

/// A KV pool smaller than the model's context is the context served: it
/// is what /v1/models says, and a request that could overfill it is a 400
/// naming `max_tokens`, not a wait that never ends.
#[test]
fn a_small_kv_pool_limits_the_context_served() {
    // 100 MiB of 23,040-byte positions (f16): 142 blocks of 32.
    let s = stack(&[("EE_KV_CACHE_MIB", "100")]);
    let models: Value = s
        .server
        .request("GET", "/v1/models", &[], "")
        .unwrap()
        .json();
    assert_eq!(models["data"][0]["context_length"], 4544);
    // In f32, positions take 46,080 bytes: 71 blocks.
    let f32 = ServerProcess::start(
        &s.pair.server_artifact,
        &[("EE_KV_CACHE_MIB", "100"), ("EE_KV_CACHE_DTYPE", "f32")],
    );
    let models: Value = f32.request("GET", "/v1/models", &[], "").unwrap().json();
    assert_eq!(models["data"][0]["context_length"], 2272);
    drop(f32);
    let prompt = s.enc(&[1, 2, 3]);
    let r = s.server.post_json(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 4542}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let e = &r.json()["error"];
    assert_eq!(e["param"], "max_tokens", "{}", r.body);
    assert_eq!(e["code"], "context_length_exceeded", "{}", r.body);
    let r = s.server.post_json(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 10, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 10);

    // A pool of 4 blocks (3 MiB): three answers of 100 tokens, each
    // growing to 4 blocks, preempt one another and are recomputed; each
    // still gets the tokens it gets alone.
    let small = ServerProcess::start(&s.pair.server_artifact, &[("EE_KV_CACHE_MIB", "3")]);
    let bodies: Vec<Value> = (1..4)
        .map(|i| {
            json!({"prompt": s.enc(&[i, 2, 3]), "max_tokens": 100, "ignore_eos": true,
                   "temperature": 0})
        })
        .collect();
    let answer = |b: &Value| {
        let r = small.post_json("/v1/completions", b);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["token_ids"].clone()
    };
    let alone: Vec<Value> = bodies.iter().map(answer).collect();
    assert_eq!(metric(&small, "ee_preemptions_total"), 0.0);
    let together: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies.iter().map(|b| scope.spawn(|| answer(b))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(metric(&small, "ee_preemptions_total") >= 1.0);
}

#[test]
fn a_corpus_of_bad_requests_gets_4xx_envelopes_and_the_server_keeps_serving() {
    let s = stack(&[
        ("EE_MAX_BODY_BYTES", "65536"),
        ("EE_CORS_ALLOWED_ORIGINS", "https://chat.example"),
    ]);
    let preflight = s
        .server
        .request(
            "OPTIONS",
            "/v1/completions",
            &[
                ("origin", "https://chat.example"),
                ("access-control-request-method", "POST"),
            ],
            "",
        )
        .unwrap();
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://chat.example")
    );
    let foreign = s
        .server
        .request("GET", "/health", &[("origin", "https://evil.example")], "")
        .unwrap();
    assert_eq!(foreign.header("access-control-allow-origin"), None);
    let ok = json!({"prompt": [1, 2, 3], "max_tokens": 2});
    let json_ct = [("content-type", "application/json")];
    let posts: Vec<(&str, String)> = vec![
        (
            "text prompt",
            json!({"prompt": "What is the capital of France?"}).to_string(),
        ),
        ("empty prompt", json!({"prompt": []}).to_string()),
        (
            "empty sequence in a batch",
            json!({"prompt": [[1], []]}).to_string(),
        ),
        (
            "token out of vocabulary",
            json!({"prompt": [49152]}).to_string(),
        ),
        ("negative token", json!({"prompt": [-1]}).to_string()),
        ("float token", json!({"prompt": [1.5]}).to_string()),
        ("missing prompt", json!({"max_tokens": 3}).to_string()),
        (
            "max_tokens zero",
            json!({"prompt": [1], "max_tokens": 0}).to_string(),
        ),
        (
            "context overflow",
            json!({"prompt": [1], "max_tokens": 9000}).to_string(),
        ),
        (
            "max_tokens is a string",
            json!({"prompt": [1], "max_tokens": "ten"}).to_string(),
        ),
        (
            "disagreeing max tokens",
            json!({"prompt": [1], "max_tokens": 3, "max_completion_tokens": 4}).to_string(),
        ),
        ("n too big", json!({"prompt": [1], "n": 1000}).to_string()),
        (
            "temperature negative",
            json!({"prompt": [1], "temperature": -0.5}).to_string(),
        ),
        ("top_p zero", json!({"prompt": [1], "top_p": 0}).to_string()),
        (
            "min_p above one",
            json!({"prompt": [1], "min_p": 2}).to_string(),
        ),
        (
            "presence penalty",
            json!({"prompt": [1], "presence_penalty": 5}).to_string(),
        ),
        (
            "logit bias key",
            json!({"prompt": [1], "logit_bias": {"abc": 1}}).to_string(),
        ),
        (
            "logit bias value",
            json!({"prompt": [1], "logit_bias": {"5": 500}}).to_string(),
        ),
        (
            "stop id out of range",
            json!({"prompt": [1], "stop_token_ids": [99999]}).to_string(),
        ),
        (
            "logprobs too many",
            json!({"prompt": [1], "logprobs": 100}).to_string(),
        ),
        (
            "stream_options without stream",
            json!({"prompt": [1], "stream_options": {"include_usage": true}}).to_string(),
        ),
        (
            "unknown model",
            json!({"prompt": [1], "model": "gpt-4"}).to_string(),
        ),
        (
            "text stop strings",
            json!({"prompt": [1], "stop": ["\n"]}).to_string(),
        ),
        (
            "unsupported field",
            json!({"prompt": [1], "response_format": {"type": "json_object"}}).to_string(),
        ),
        ("not JSON", "{\"prompt\": [1,".to_string()),
        (
            "deep nesting",
            format!("{{\"prompt\": {}1{}}}", "[".repeat(200), "]".repeat(200)),
        ),
        (
            "too large",
            json!({"prompt": vec![1u32; 40000]}).to_string(),
        ),
    ];
    for (what, body) in &posts {
        let r = s
            .server
            .request("POST", "/v1/completions", &json_ct, body)
            .unwrap();
        assert_envelope(r.status, &r.body, what);
    }
    let chat_bad = [
        (
            "chat text content",
            json!({"messages": [{"role": "user", "content": "hello"}]}),
        ),
        (
            "chat text part",
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}),
        ),
        (
            "chat image part",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
        ),
        ("chat no messages", json!({"messages": []})),
        (
            "chat unknown role",
            json!({"messages": [{"role": "wizard", "content": [{"type": "token_ids", "token_ids": [1]}]}]}),
        ),
        (
            "chat top_logprobs without logprobs",
            json!({"messages": [{"role": "user", "content": [{"type": "token_ids", "token_ids": [1]}]}], "top_logprobs": 2}),
        ),
    ];
    for (what, body) in &chat_bad {
        let r = s.server.post_json("/v1/chat/completions", body);
        assert_envelope(r.status, &r.body, what);
    }
    let text = r#"{"prompt":[1]}"#;
    for (what, method, path, headers) in [
        ("unknown route", "POST", "/v1/nope", &json_ct[..]),
        ("wrong method", "GET", "/v1/completions", &json_ct[..]),
        (
            "wrong content type",
            "POST",
            "/v1/completions",
            &[("content-type", "text/plain")][..],
        ),
        ("no content type", "POST", "/v1/completions", &[][..]),
    ] {
        let r = s.server.request(method, path, headers, text).unwrap();
        assert_envelope(r.status, &r.body, what);
    }
    let statuses = |what: &str, want: u16, r: ee_e2e::HttpResponse| {
        assert_eq!(r.status, want, "{what}: {}", r.body)
    };
    let too_large = &posts.iter().find(|(w, _)| *w == "too large").unwrap().1;
    statuses(
        "too large is 413",
        413,
        s.server
            .request("POST", "/v1/completions", &json_ct, too_large)
            .unwrap(),
    );
    statuses(
        "unknown route is 404",
        404,
        s.server.request("GET", "/v2", &[], "").unwrap(),
    );
    statuses(
        "wrong method is 405",
        405,
        s.server
            .request("DELETE", "/v1/completions", &[], "")
            .unwrap(),
    );
    statuses(
        "wrong type is 415",
        415,
        s.server
            .request(
                "POST",
                "/v1/completions",
                &[("content-type", "text/plain")],
                text,
            )
            .unwrap(),
    );
    assert!(posts.len() + chat_bad.len() + 4 >= 20);
    // Nothing broke: a valid request still works.
    let r = s.server.post_json("/v1/completions", &ok);
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn api_keys_overload_and_graceful_shutdown() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let mut server = ServerProcess::start(
        &pair.server_artifact,
        &[
            ("EE_API_KEYS", "s3cret,other"),
            ("EE_MAX_BATCH", "1"),
            ("EE_MAX_QUEUE", "1"),
        ],
    );
    assert_eq!(
        server.request("GET", "/health", &[], "").unwrap().status,
        200,
        "/health stays public"
    );
    let r = server.request("GET", "/v1/models", &[], "").unwrap();
    assert_eq!(r.status, 401);
    assert_envelope(r.status, &r.body, "no key");
    assert_eq!(
        server
            .request(
                "GET",
                "/v1/models",
                &[("authorization", "Bearer wrong")],
                ""
            )
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        server
            .request(
                "GET",
                "/v1/models",
                &[("authorization", "Bearer other")],
                ""
            )
            .unwrap()
            .status,
        200
    );

    // A proxy without the server's key answers 502 naming its own key, not
    // a 401 the client would take for its own; with the key, it serves.
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let keyless = ServerProcess::proxy(&pair.bundle.dir, &server.url());
    let r = keyless.post_json("/v1/chat/completions", &chat);
    assert_eq!(r.status, 502, "{}", r.body);
    assert_envelope_shape(&r.body, "a proxy without the key");
    assert!(
        r.body.contains("upstream_unauthorized") && r.body.contains("--api-key"),
        "{}",
        r.body
    );
    let keyed =
        ServerProcess::proxy_with(&pair.bundle.dir, &server.url(), &["--api-key", "s3cret"]);
    let r = keyed.post_json("/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.body);
    drop((keyless, keyed));

    // One running and one waiting fill the server: a burst gets 429s with Retry-After.
    let auth = [
        ("content-type", "application/json"),
        ("authorization", "Bearer s3cret"),
    ];
    let long = json!({"prompt": [1, 2, 3], "max_tokens": 60, "ignore_eos": true}).to_string();
    let results: Vec<ee_e2e::HttpResponse> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    http_request(
                        server.addr,
                        "POST",
                        "/v1/completions",
                        &auth,
                        long.as_bytes(),
                    )
                    .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let limited: Vec<_> = results.iter().filter(|r| r.status == 429).collect();
    assert!(
        !limited.is_empty(),
        "no 429 among {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(limited[0].header("retry-after"), Some("1"));
    assert_envelope(429, &limited[0].body, "overloaded");
    assert!(results.iter().any(|r| r.status == 200));

    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_request_past_the_timeout_is_cancelled_with_504() {
    let s = stack(&[("EE_REQUEST_TIMEOUT_SECS", "1")]);
    let started = Instant::now();
    let r = s.server.post_json(
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 6000, "ignore_eos": true}),
    );
    assert_eq!(r.status, 504, "{}", r.body);
    assert_envelope_shape(&r.body, "timeout");
    assert!(started.elapsed() < Duration::from_secs(20));
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&s.server, "ee_running_sequences") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the timed-out sequence kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An operator who points the server at the plaintext model (it still
/// carries its tokenizer) is refused with a message that says what to do,
/// unless they insist with --allow-plaintext.
#[test]
fn a_plaintext_model_is_refused_unless_allowed() {
    let out = std::process::Command::new(ee_e2e::binary("ee-server"))
        .arg("--model")
        .arg(model_path())
        .arg("--listen")
        .arg(ee_e2e::free_addr().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "plaintext model",
        "tokenizer.ggml",
        "ee encrypt-model",
        "--allow-plaintext",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    let server = ServerProcess::start(&model_path(), &[("EE_ALLOW_PLAINTEXT", "true")]);
    let r = server.post_json(
        "/v1/completions",
        &json!({"prompt": [1, 4093, 198], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Served names, as vLLM's --served-model-name: all listed, each retrievable
/// and accepted as `model`; responses carry the first; others are a 404.
#[test]
fn served_model_names_are_listed_retrievable_and_accepted() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let server = ServerProcess::start(
        &pair.server_artifact,
        &[("EE_SERVED_MODEL_NAMES", "smol, smol-alias")],
    );
    let list = server.request("GET", "/v1/models", &[], "").unwrap();
    let ids: Vec<String> = list.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["smol", "smol-alias"]);
    let one = server
        .request("GET", "/v1/models/smol-alias", &[], "")
        .unwrap();
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json()["id"], "smol-alias");
    assert!(one.json()["context_length"].as_u64().unwrap() > 0);
    let missing = server.request("GET", "/v1/models/gpt-4", &[], "").unwrap();
    assert_envelope(missing.status, &missing.body, "an unknown model");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "model_not_found");
    let r = server.post_json(
        "/v1/completions",
        &json!({"model": "smol-alias", "prompt": [1, 2, 3], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model"], "smol");
    // Every response names the artifact, so a key holder can check each.
    assert_eq!(
        r.header("x-ee-artifact-sha256"),
        Some(pair.bundle.manifest.server_artifact.sha256.as_str())
    );
    let r = server.post_json(
        "/v1/completions",
        &json!({"model": "other", "prompt": [1, 2, 3], "max_tokens": 2}),
    );
    assert_eq!(r.status, 404, "{}", r.body);
}

/// A half-sent request cannot keep the server alive after SIGTERM: it exits
/// at the drain deadline, and at once on a second signal.
#[test]
fn shutdown_has_a_deadline_and_a_second_signal_forces_it() {
    use std::io::Write;
    let pair = encrypt_real_model(&KeySource::Identity);
    for second_signal in [false, true] {
        let mut server =
            ServerProcess::start(&pair.server_artifact, &[("EE_SHUTDOWN_DRAIN_SECS", "3")]);
        // Headers begun and never finished, and a long generation.
        let mut stalled = std::net::TcpStream::connect(server.addr).unwrap();
        stalled
            .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let addr = server.addr;
        std::thread::spawn(move || {
            let body =
                json!({"prompt": [1, 2], "max_tokens": 4000, "ignore_eos": true}).to_string();
            let _ = http_request(
                addr,
                "POST",
                "/v1/completions",
                &[("content-type", "application/json")],
                body.as_bytes(),
            );
        });
        std::thread::sleep(Duration::from_millis(300));
        let pid = server.child.id().to_string();
        let kill = || {
            assert!(std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success());
        };
        let started = Instant::now();
        kill();
        if second_signal {
            std::thread::sleep(Duration::from_millis(300));
            kill();
        }
        let limit = if second_signal {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        loop {
            if server.child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                started.elapsed() < limit,
                "still running after {:?} (second signal: {second_signal})",
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(stalled);
    }
}
