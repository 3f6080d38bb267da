//! The server's logs: plain text or JSON lines, no colour codes in a file,
//! and a streamed request logged with its real duration.

use std::time::{Duration, Instant};

use ee_client::model_tool::KeySource;
use ee_e2e::{encrypt_real_model, free_addr, http_request, model_path};
use serde_json::{json, Value};

/// Logs written to a file (or `docker logs`) carry no colour codes, and
/// EE_LOG_FORMAT=json writes one JSON object a line.
#[test]
fn logs_to_a_file_are_plain_text_or_json_lines() {
    let run = |format: &str| {
        // A plaintext model is refused after the first log lines: a quick
        // run that logs.
        let out = std::process::Command::new(ee_e2e::binary("ee-server"))
            .arg("--model")
            .arg(model_path())
            .arg("--listen")
            .arg(ee_e2e::free_addr().to_string())
            .env("EE_LOG_FORMAT", format)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let text = run("text");
    assert!(text.contains("listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "ANSI codes in {text:?}");
    let json = run("json");
    let lines: Vec<&str> = json.lines().filter(|l| l.starts_with('{')).collect();
    assert!(!lines.is_empty(), "{json}");
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
}

#[test]
fn a_streamed_request_is_logged_with_its_whole_duration() {
    let pair = encrypt_real_model(&KeySource::Identity);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let addr = free_addr();
    // Killed on drop, so a failed assertion leaves no server behind.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        std::process::Command::new(ee_e2e::binary("ee-server"))
            .arg("--model")
            .arg(&pair.server_artifact)
            .arg("--listen")
            .arg(addr.to_string())
            .env("EE_LOG_FORMAT", "json")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_request(addr, "GET", "/health", &[], b"").map_or(true, |r| r.status != 200) {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 48, "ignore_eos": true, "stream": true});
    let started = Instant::now();
    let r = http_request(
        addr,
        "POST",
        "/v1/completions",
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    )
    .unwrap();
    let wall = started.elapsed().as_millis() as u64;
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(200));
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["path"] == "/v1/completions")
        .unwrap_or_else(|| panic!("no request line in {text}"));
    let ms = line["fields"]["ms"].as_u64().unwrap();
    let headers_ms = line["fields"]["headers_ms"].as_u64().unwrap();
    // The whole answer, not the time to its headers.
    assert!(
        ms * 2 >= wall && ms > headers_ms,
        "ms {ms}, headers {headers_ms}, wall {wall}"
    );
}
