//! Structured output (`response_format`) and tool calls through the whole
//! stack, on the real model: every answer parses and validates against its
//! schema (checked by an independent validator, the `jsonschema` crate), the
//! encrypted stack says exactly what the identity-key stack says, the
//! official SDK's tool loop works with only `base_url` changed, and what
//! llguidance cannot compile is a 400 naming the parameter.

use ee_client::model_tool::KeySource;
use ee_e2e::{encrypt_real_model, RecordingRelay, ServerProcess};
use serde_json::{json, Value};

struct Stack {
    _pair: ee_e2e::EncryptedPair,
    _server: ServerProcess,
    relay: RecordingRelay,
    proxy: ServerProcess,
}

fn stack(key: KeySource) -> Stack {
    let pair = encrypt_real_model(&key);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let relay = RecordingRelay::start(server.addr);
    let proxy = ServerProcess::proxy(&pair.bundle.dir, &relay.url());
    Stack {
        _pair: pair,
        _server: server,
        relay,
        proxy,
    }
}

fn schema_request(question: &str, schema: &Value, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 160,
        "temperature": 0,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "answer", "schema": schema}},
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body
}

/// Twenty schemas over the features people use: nested objects, enums,
/// arrays, numbers with bounds, `$ref`, `anyOf`, nullable and patterned
/// strings. Strings and arrays are bounded so that a small model's answer
/// ends well inside `max_tokens`.
fn schemas() -> Vec<(&'static str, Value)> {
    let s = |n: u32| json!({"type": "string", "maxLength": n});
    vec![
        (
            "Describe a person.",
            json!({"type": "object", "properties": {"name": s(20), "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}),
        ),
        (
            "Pick a color.",
            json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}),
        ),
        (
            "List fruits.",
            json!({"type": "object", "properties": {"fruits": {"type": "array", "items": s(12), "minItems": 1, "maxItems": 3}}, "required": ["fruits"]}),
        ),
        (
            "Who wrote Hamlet?",
            json!({"type": "object", "properties": {"author": {"type": "object", "properties": {"first": s(12), "last": s(12)}, "required": ["first", "last"]}, "tags": {"type": "array", "items": s(8), "maxItems": 2}}, "required": ["author", "tags"]}),
        ),
        (
            "Price a coffee.",
            json!({"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 100}, "quantity": {"type": "integer", "minimum": 1, "maximum": 10}}, "required": ["price", "quantity"]}),
        ),
        (
            "Is the sky blue?",
            json!({"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]}),
        ),
        (
            "Make a to-do list.",
            json!({"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "label": s(15)}, "required": ["id", "label"]}}}, "required": ["items"]}),
        ),
        (
            "Say the version.",
            json!({"type": "object", "properties": {"version": {"const": "v1"}, "ok": {"type": "boolean"}}, "required": ["version", "ok"]}),
        ),
        (
            "Give an identifier.",
            json!({"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9999}, s(10)]}}, "required": ["id"]}),
        ),
        (
            "Give a nickname, if any.",
            json!({"type": "object", "properties": {"nickname": {"type": ["string", "null"], "maxLength": 12}}, "required": ["nickname"]}),
        ),
        (
            "Name an airport code.",
            json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["code"]}),
        ),
        (
            "Write a short title.",
            json!({"type": "object", "properties": {"title": s(10)}, "required": ["title"]}),
        ),
        (
            "When is new year?",
            json!({"type": "object", "properties": {"date": {"type": "string", "format": "date"}}, "required": ["date"]}),
        ),
        (
            "Describe two points.",
            json!({"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"]}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}, "required": ["a", "b"]}),
        ),
        (
            "Describe a city.",
            json!({"type": "object", "properties": {"name": s(15), "country": s(15)}, "required": ["name"], "additionalProperties": false}),
        ),
        (
            "Count to three.",
            json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 3, "maxItems": 3}),
        ),
        (
            "Rate the film from 1 to 5.",
            json!({"type": "object", "properties": {"stars": {"enum": [1, 2, 3, 4, 5]}}, "required": ["stars"]}),
        ),
        (
            "Describe a company.",
            json!({"type": "object", "properties": {"company": {"type": "object", "properties": {"ceo": {"type": "object", "properties": {"name": s(15), "since": {"type": "integer", "minimum": 1900, "maximum": 2030}}, "required": ["name", "since"]}}, "required": ["ceo"]}}, "required": ["company"]}),
        ),
        (
            "What is the temperature?",
            json!({"type": "object", "properties": {"celsius": {"type": "number", "exclusiveMinimum": -100, "maximum": 60}}, "required": ["celsius"]}),
        ),
        (
            "Tag this post.",
            json!({"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["news", "sport", "tech"]}, "maxItems": 3}, "lang": s(5)}, "required": ["tags"]}),
        ),
    ]
}

fn content(response: &Value) -> &str {
    response["choices"][0]["message"]["content"]
        .as_str()
        .expect("a message")
}

#[test]
fn every_answer_parses_and_validates_against_its_schema() {
    let s = stack(KeySource::Generate);
    let schemas = schemas();
    assert_eq!(schemas.len(), 20);
    for (question, schema) in &schemas {
        let r = s.proxy.post_json(
            "/v1/chat/completions",
            &schema_request(question, schema, json!({})),
        );
        assert_eq!(r.status, 200, "{schema}: {}", r.body);
        let v = r.json();
        let text = content(&v);
        let parsed: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{schema}: not JSON ({e}): {text:?}"));
        let validator = jsonschema::validator_for(schema).expect("a valid schema");
        let errors: Vec<String> = validator
            .iter_errors(&parsed)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{schema}: {text} fails: {errors:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{text}");
        assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }
    // Log-probabilities beside a mask: only allowed tokens are alternatives.
    let (question, schema) = &schemas[1];
    let body = schema_request(
        question,
        schema,
        json!({"logprobs": true, "top_logprobs": 5}),
    );
    let r = s.proxy.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let lp = r.json()["choices"][0]["logprobs"]["content"].clone();
    let tops: Vec<&Value> = lp
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["top_logprobs"].as_array().unwrap())
        .collect();
    assert!(!tops.is_empty());
    assert!(
        tops.iter()
            .all(|t| t["logprob"].as_f64().is_some_and(f64::is_finite)),
        "{lp}"
    );
    // JSON mode: any object.
    let body = json!({"messages": [{"role": "user", "content": "Give a dog's name and age as a JSON object with the keys name and age."}],
                      "max_tokens": 160, "temperature": 0,
                      "response_format": {"type": "json_object"}});
    let r = s.proxy.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let text = content(&r.json()).to_owned();
    let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(parsed.is_object(), "{text}");
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop", "{text}");
    // The server was told only encrypted masks: no schema word crossed.
    let wire = String::from_utf8_lossy(&s.relay.captured()).into_owned();
    assert!(
        wire.contains("first_token_mask"),
        "no restart was ever needed?"
    );
    for word in ["json_schema", "airport", "properties", "maxLength"] {
        assert!(!wire.contains(word), "{word:?} crossed the wire");
    }
    // What the masks show the server (SECURITY.md): how many there were,
    // how large, and how many encrypted IDs a one-token mask pinned down.
    let masks = allowed_sets(&wire);
    let singletons: std::collections::BTreeSet<u32> = masks
        .iter()
        .filter(|m| m.len() == 1)
        .map(|m| m[0])
        .collect();
    let small = masks.iter().filter(|m| m.len() <= 16).count();
    println!(
        "masks: {} over 21 answers; {small} of at most 16 tokens; {} distinct IDs pinned alone",
        masks.len(),
        singletons.len()
    );
    assert!(masks.len() >= 21, "one mask per answer at least");
    assert!(singletons.len() < 200, "{singletons:?}");
}

/// The allowed IDs of every `first_token_mask` in a capture.
fn allowed_sets(wire: &str) -> Vec<Vec<u32>> {
    use base64::Engine as _;
    let key = "\"first_token_mask\":\"";
    wire.match_indices(key)
        .map(|(at, _)| {
            let rest = &wire[at + key.len()..];
            let b64 = &rest[..rest.find('"').expect("end of the mask")];
            let bits = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("base64");
            (0..bits.len() as u32 * 8)
                .filter(|i| bits[*i as usize / 8] & (1 << (i % 8)) != 0)
                .collect()
        })
        .collect()
}

/// The encrypted stack and the identity-key stack give the same structured
/// answers, greedy and seeded, streamed and not, on chat and completions.
#[test]
fn structured_answers_are_the_same_through_the_encrypted_stack() {
    let plain = stack(KeySource::Identity);
    let secret = stack(KeySource::Generate);
    let schemas = schemas();
    for (i, extra) in [
        json!({}),
        json!({"temperature": 0.9, "seed": 11}),
        json!({"temperature": 0.7, "seed": 3, "stream": true}),
    ]
    .into_iter()
    .enumerate()
    {
        for (question, schema) in schemas.iter().skip(i).step_by(4) {
            let body = schema_request(question, schema, extra.clone());
            let a = ee_e2e::answer_text(&plain.proxy, "/v1/chat/completions", &body);
            let b = ee_e2e::answer_text(&secret.proxy, "/v1/chat/completions", &body);
            assert_eq!(a, b, "{body}");
            assert!(serde_json::from_str::<Value>(&a).is_ok(), "{a:?}");
        }
    }
    // A forced tool call, streamed and not.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"]}}}]);
    for extra in [
        json!({"temperature": 0}),
        json!({"temperature": 0.8, "seed": 2, "stream": true}),
    ] {
        let mut body = json!({"messages": [{"role": "user", "content": "Weather in Oslo?"}],
                              "tools": tools, "tool_choice": "required", "max_tokens": 40});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let a = plain.proxy.post_json("/v1/chat/completions", &body);
        let b = secret.proxy.post_json("/v1/chat/completions", &body);
        let calls = |r: &ee_e2e::HttpResponse| -> Vec<Value> {
            let chunks = match body["stream"] == json!(true) {
                true => r
                    .sse_data()
                    .iter()
                    .filter(|d| *d != "[DONE]")
                    .map(|d| serde_json::from_str::<Value>(d).unwrap())
                    .collect(),
                false => vec![r.json()],
            };
            chunks
                .iter()
                .flat_map(|c| c["choices"].as_array().unwrap().clone())
                .flat_map(|c| {
                    let calls = c["message"]["tool_calls"]
                        .as_array()
                        .or(c["delta"]["tool_calls"].as_array());
                    calls.cloned().unwrap_or_default()
                })
                .map(|c| c["function"].clone())
                .collect()
        };
        let (x, y) = (calls(&a), calls(&b));
        assert_eq!(x.len(), 1, "{}", a.body);
        assert_eq!(x, y, "{body}");
    }
    let body = json!({"prompt": "A JSON list of three primes:", "max_tokens": 40, "temperature": 0,
                      "response_format": {"type": "json_schema", "json_schema": {"name": "p",
                      "schema": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}}}});
    let a = ee_e2e::answer_text(&plain.proxy, "/v1/completions", &body);
    let b = ee_e2e::answer_text(&secret.proxy, "/v1/completions", &body);
    assert_eq!(a, b);
    assert!(serde_json::from_str::<Vec<i64>>(&a).is_ok(), "{a:?}");
}

#[test]
fn what_cannot_be_compiled_is_a_400_naming_response_format() {
    let s = stack(KeySource::Generate);
    let cases = [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": true}}}),
            "response_format",
            "uniqueItems",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}),
            "response_format",
            "",
        ),
        (
            json!({"type": "yaml"}),
            "response_format.type",
            "json_schema",
        ),
        (
            json!({"type": "json_schema"}),
            "response_format.json_schema",
            "json_schema",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"schema": {}}}),
            "response_format.json_schema.name",
            "name",
        ),
        (
            json!({"type": "json_object", "schema": {}}),
            "response_format.schema",
            "schema",
        ),
        (json!("json"), "response_format", "object"),
    ];
    for (format, param, word) in cases {
        let body =
            json!({"messages": [{"role": "user", "content": "hi"}], "response_format": format});
        let r = s.proxy.post_json("/v1/chat/completions", &body);
        assert_eq!(r.status, 400, "{format}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["param"], param, "{format}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains(word),
            "{format}: {e}"
        );
    }
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "n": 2,
                      "response_format": {"type": "json_object"}});
    let r = s.proxy.post_json("/v1/chat/completions", &body);
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"]["param"], "n");
    // Still serving.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    assert_eq!(s.proxy.post_json("/v1/chat/completions", &body).status, 200);
}

/// The official SDK: a forced call, its result sent back, the final
/// answer; the same call streamed; `chat.completions.parse` with a
/// pydantic model; JSON mode; a streamed schema. No tool name, argument or
/// schema word crosses the wire.
#[test]
fn the_openai_sdk_tool_loop_and_structured_output_work_through_the_proxy() {
    let s = stack(KeySource::Generate);
    let r = ee_e2e::run_openai_script("openai_tools.py", &s.proxy.url(), &[]);
    let call = &r["call"];
    assert_eq!(call["finish_reason"], "tool_calls", "{r}");
    assert_eq!(call["name"], "get_weather");
    assert!(call["arguments"]["city"].is_string(), "{call}");
    assert_eq!(call["arguments"].as_object().unwrap().len(), 1, "{call}");
    assert!(call["content"].is_null());
    assert_eq!(r["final"]["finish_reason"], "stop", "{r}");
    assert!(!r["final"]["content"].as_str().unwrap().is_empty());
    assert!(r["final"]["tool_calls"].is_null());
    assert_eq!(r["streamed"]["finish_reason"], "tool_calls");
    assert_eq!(
        r["streamed"]["calls"],
        json!([{"name": "get_weather", "arguments": call["arguments"]}])
    );
    let parsed = &r["parsed"];
    assert!(
        parsed["name"].is_string() && parsed["country"].is_string(),
        "{parsed}"
    );
    assert!(parsed["population_millions"]
        .as_i64()
        .is_some_and(|p| (0..=100).contains(&p)));
    assert!(r["json_object"].is_object());
    assert_eq!(r["streamed_schema"], *parsed, "streamed and not agree");
    let wire = String::from_utf8_lossy(&s.relay.captured()).into_owned();
    for word in ["get_weather", "tool_call", "Paris", "population", "sunny"] {
        assert!(!wire.contains(word), "{word:?} crossed the wire");
    }
}
