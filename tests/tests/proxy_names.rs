//! `ee proxy --served-model-name` (vLLM's flag): the proxy lists, accepts
//! and answers with its own names for the model, and the server is asked
//! for the model it hosts.

use ee_client::model_tool::KeySource;
use ee_e2e::{encrypt_real_model, ServerProcess};
use serde_json::json;

#[test]
fn the_proxy_serves_the_model_under_its_own_names() {
    let pair = encrypt_real_model(&KeySource::Identity);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let proxy = ServerProcess::proxy_with(
        &pair.bundle.dir,
        &format!("http://{}", server.addr),
        &[
            "--served-model-name",
            "my-model",
            "--served-model-name",
            "alias",
        ],
    );
    let r = ee_e2e::http_request(proxy.addr, "GET", "/v1/models", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let list = r.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["my-model", "alias"]);
    assert!(list["data"][1]["context_length"].as_u64().unwrap() >= 2048);
    let get = |path: &str| ee_e2e::http_request(proxy.addr, "GET", path, &[], b"").unwrap();
    assert_eq!(get("/v1/models/alias").json()["id"], "alias");
    let missing = get("/v1/models/ee-model");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "model_not_found");

    let ask = |model: Option<&str>| {
        let mut body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
        if let Some(m) = model {
            body["model"] = json!(m);
        }
        proxy.post_json("/v1/chat/completions", &body)
    };
    let r = ask(Some("alias"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["model"], "alias");
    assert_eq!(ask(None).json()["model"], "my-model");
    // The server's own name is not one of the proxy's.
    let r = ask(Some("ee-model"));
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_eq!(r.json()["error"]["param"], "model");
}
