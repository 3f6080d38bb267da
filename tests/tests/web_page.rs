//! The proxy's chat page in a real browser: headless Chromium (Debian's
//! `chromium`), driven over the DevTools protocol, types a message, presses
//! Send and watches the answer stream in.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ee_client::model_tool::KeySource;
use ee_e2e::{encrypt_real_model, ServerProcess};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: Option<String>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn start() -> Self {
        let exe = std::env::var("EE_CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-extensions",
                "--no-first-run",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {exe} ({e}): install Debian's chromium package")
            });
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let ws = loop {
            let line = lines
                .next()
                .expect("chromium exited before DevTools listened")
                .expect("read chromium's stderr");
            if let Some(url) = line.split("DevTools listening on ").nth(1) {
                break url.trim().to_owned();
            }
        };
        // Keep draining stderr so chromium never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        // The browser's own socket; the page is reached through a session
        // on it (DevTools' HTTP endpoints keep connections open).
        let (socket, _) = tungstenite::connect(ws).expect("connect to chromium");
        if let tungstenite::stream::MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_secs(120)))
                .expect("read timeout");
        }
        let mut browser = Browser {
            child,
            _profile: profile,
            socket,
            next_id: 1,
            session: None,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        browser.session = Some(attached["sessionId"].as_str().expect("session").to_owned());
        browser
    }
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.socket
            .send(Message::text(msg.to_string()))
            .expect("send to chromium");
        loop {
            let reply = self.socket.read().expect("read from chromium");
            let Ok(text) = reply.to_text() else { continue };
            let v: Value = serde_json::from_str(text).expect("DevTools JSON");
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }
}

#[test]
fn the_chat_page_streams_an_answer_in_headless_chromium() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let proxy = ServerProcess::proxy(&pair.bundle.dir, &server.url());
    let question = "Write a short poem about the ocean.";
    // What the proxy answers to the page's request, for comparison.
    let expected = proxy.post_json(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 256}),
    );
    assert_eq!(expected.status, 200, "{}", expected.body);
    let expected = expected.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();

    let mut browser = Browser::start();
    browser.call("Page.navigate", json!({"url": format!("{}/", proxy.url())}));
    let deadline = Instant::now() + Duration::from_secs(60);
    while browser.eval("document.readyState") != json!("complete")
        || browser.eval("!!document.getElementById('send')") != json!(true)
    {
        assert!(Instant::now() < deadline, "the page did not load");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(browser.eval("document.title"), json!("EE private chat"));
    browser.eval(&format!(
        "document.getElementById('input').value = {}; document.getElementById('send').click(); true",
        json!(question)
    ));

    let probe = "(() => { const a = document.querySelector('.assistant'); return a ? {state: a.dataset.state, chunks: Number(a.dataset.chunks), text: a.querySelector('.text').textContent, wire: a.querySelector('.wire').textContent} : null; })()";
    let mut partials = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    let last = loop {
        let seen = browser.eval(probe);
        if seen["state"] == "done" || seen["state"] == "error" {
            break seen;
        }
        if let Some(t) = seen["text"].as_str().filter(|t| !t.is_empty()) {
            partials.push(t.to_owned());
        }
        assert!(Instant::now() < deadline, "no answer: {seen}");
        std::thread::sleep(Duration::from_millis(15));
    };
    assert_eq!(last["state"], "done", "{last}");
    let text = last["text"].as_str().expect("text");
    assert_eq!(text, expected);
    assert!(last["chunks"].as_u64().unwrap() > 10, "{last}");
    // It streamed: the page showed a growing prefix before the end.
    assert!(
        partials
            .iter()
            .any(|p| p.len() < text.len() && text.starts_with(p.as_str())),
        "no partial answer was seen ({} probes)",
        partials.len()
    );
    // What the server saw: encrypted IDs, listed beside the answer.
    let wire = last["wire"].as_str().expect("wire");
    assert!(wire.starts_with("server received "), "{wire}");
    assert!(!wire.contains("ocean"), "{wire}");
}
