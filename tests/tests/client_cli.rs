//! The client's commands as processes: `ee chat` against a real server,
//! and `ee demo` started, asked and stopped with Ctrl-C.

use std::path::Path;
use std::process::Command;

use ee_client::model_tool::KeySource;
use ee_e2e::{binary, encrypt_real_model, stdout_of, workspace_root, ServerProcess};
use serde_json::json;

#[test]
fn ee_chat_answers_one_shot_and_interactively() {
    use std::io::Write;
    let pair = encrypt_real_model(&KeySource::Generate);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let bundle: &Path = &pair.bundle.dir;
    let out = Command::new(binary("ee"))
        .arg("chat")
        .arg("--bundle")
        .arg(bundle)
        .args(["--server", &server.url(), "What is the capital of France?"])
        .output()
        .expect("run ee chat");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let one_shot = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(one_shot.contains("Paris"), "{one_shot}");

    let mut child = Command::new(binary("ee"))
        .arg("chat")
        .arg("--bundle")
        .arg(bundle)
        .args(["--server", &server.url(), "--max-tokens", "24"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ee chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"What is the capital of France?\nAnd of Italy?\n")
        .expect("write");
    let out = child.wait_with_output().expect("ee chat");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let answers: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(answers.len() >= 2, "{text}");
    assert!(text.contains("Paris") && text.contains("Rome"), "{text}");
}

/// On a terminal: Ctrl-C stops the answer, not the chat; keys typed while
/// it streams are not echoed into it; the up arrow recalls the question;
/// the conversation goes on; Ctrl-D quits cleanly. A cut-off answer is
/// marked.
#[test]
fn ee_chat_on_a_terminal_stops_answers_not_the_chat() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let out = stdout_of(
        Command::new("python3")
            .arg(workspace_root().join("tests/py/chat_pty.py"))
            .arg(binary("ee"))
            .arg(&pair.bundle.dir)
            .arg(server.url()),
    );
    let report: serde_json::Value = serde_json::from_slice(&out).expect("report");
    let streamed = report["streamed"].as_str().unwrap();
    assert!(streamed.len() > 40, "{report}");
    assert!(!streamed.contains("typed-while-streaming"), "{report}");
    assert!(
        report["second"].as_str().unwrap().contains("Paris"),
        "{report}"
    );
    assert_eq!(report["exit"], 0, "{report}");

    let cut = Command::new(binary("ee"))
        .arg("chat")
        .arg("--bundle")
        .arg(&pair.bundle.dir)
        .args([
            "--server",
            &server.url(),
            "--max-tokens",
            "3",
            "Tell me a story.",
        ])
        .output()
        .expect("run ee chat");
    assert!(cut.status.success());
    let marker = String::from_utf8_lossy(&cut.stderr);
    assert!(marker.contains("[cut off"), "{marker}");
}

/// A running `ee demo` on `model`, on free ports.
struct Demo {
    child: std::process::Child,
    /// What it printed up to its "Ctrl-C" line.
    printed: String,
    /// The proxy's address.
    addr: std::net::SocketAddr,
    progress: std::thread::JoinHandle<String>,
    dir: tempfile::TempDir,
}

fn start_demo(model: &std::path::Path) -> Demo {
    use std::io::{BufRead, BufReader, Read};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(binary("ee"))
        .arg("demo")
        .arg("--dir")
        .arg(dir.path())
        .arg("--model")
        .arg(model)
        .args(["--server-port", "0", "--proxy-port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ee demo");
    let mut stderr = child.stderr.take().expect("stderr");
    let progress = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut printed = String::new();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let base_url = loop {
        let line = lines
            .next()
            .expect("ee demo ended early")
            .expect("read stdout");
        printed.push_str(&line);
        printed.push('\n');
        if let Some(url) = line.trim().strip_prefix("base_url:") {
            break url.split_whitespace().next().expect("a URL").to_owned();
        }
    };
    for line in lines.by_ref() {
        let line = line.expect("read stdout");
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("Ctrl-C") {
            break;
        }
    }
    let addr = base_url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .parse()
        .expect("proxy address");
    Demo {
        child,
        printed,
        addr,
        progress,
        dir,
    }
}

impl Demo {
    /// Stops it with Ctrl-C; returns its progress output.
    fn stop(mut self) -> (String, tempfile::TempDir) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill -INT");
        assert!(status.success());
        let exit = self.child.wait().expect("ee demo exits");
        assert!(exit.success(), "{exit}");
        let progress = self.progress.join().expect("stderr reader");
        for step in ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"] {
            assert!(progress.contains(step), "{progress}");
        }
        (progress, self.dir)
    }
}

#[test]
fn ee_demo_runs_the_whole_system_until_ctrl_c() {
    let demo = start_demo(&ee_e2e::model_path());
    let printed = &demo.printed;
    assert!(
        printed.contains("chat page:") && printed.contains("curl "),
        "{printed}"
    );
    let r = ee_e2e::http_request(
        demo.addr,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0})
            .to_string()
            .as_bytes(),
    )
    .expect("ask the demo");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    assert_eq!(
        ee_e2e::http_request(demo.addr, "GET", "/", &[], b"")
            .unwrap()
            .status,
        200
    );
    let (_, dir) = demo.stop();
    for file in ["key.json", "server.gguf", "bundle/bundle.json"] {
        assert!(dir.path().join(file).exists(), "{file}");
    }
}

#[test]
fn ee_demo_with_an_encoder_serves_encrypted_embeddings() {
    let demo = start_demo(&ee_e2e::encoder_path());
    assert!(
        demo.printed.contains("client.embeddings.create(") && !demo.printed.contains("chat page:"),
        "{}",
        demo.printed
    );
    let r = ee_e2e::http_request(
        demo.addr,
        "POST",
        "/v1/embeddings",
        &[("content-type", "application/json")],
        json!({"model": "ee-model", "input": ["a cat sits on the mat"]})
            .to_string()
            .as_bytes(),
    )
    .expect("ask the demo");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json()["data"][0]["embedding"].clone();
    let norm: f64 = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum();
    assert_eq!(v.as_array().unwrap().len(), 384);
    assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
    let (_, dir) = demo.stop();
    for file in [
        "server/config.json",
        "server/model.safetensors",
        "bundle/bundle.json",
    ] {
        assert!(dir.path().join(file).exists(), "{file}");
    }
}

#[test]
fn ee_demo_reports_a_busy_port_before_making_a_key() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = busy.local_addr().expect("its address").port().to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(binary("ee"))
        .arg("demo")
        .arg("--dir")
        .arg(dir.path())
        .arg("--model")
        .arg(ee_e2e::model_path())
        .args(["--server-port", "0", "--proxy-port", &port])
        .output()
        .expect("run ee demo");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&port) && err.contains("--proxy-port"), "{err}");
    assert!(
        !dir.path().join("key.json").exists(),
        "a key was made: {err}"
    );
}
