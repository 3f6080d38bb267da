//! The proxy's chat page in a real browser: headless Chromium (Debian's
//! `chromium`), driven over the DevTools protocol. It types, sends, watches
//! the answer stream in, stops one, retries a failed one, reloads, switches
//! to dark mode, and saves screenshots under `target/chat-page/` (look at
//! them after a change to the page).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
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
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is true.
    fn wait_for(&mut self, expression: &str, seconds: u64) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        while self.eval(expression) != json!(true) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {expression}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Opens `url` and waits for the page's script to be ready.
    fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for("document.readyState === 'complete' && !!window.eeChat", 60);
    }

    fn screenshot(&mut self, name: &str) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64");
        let dir = ee_e2e::workspace_root().join("target/chat-page");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(name), png).expect("write screenshot");
    }

    /// Types `text` into the box and presses Send.
    fn ask(&mut self, text: &str) {
        self.eval(&format!(
            "document.getElementById('input').value = {}; document.getElementById('send').click(); true",
            json!(text)
        ));
    }

    /// Sets a number or text field and tells the page it changed.
    fn set(&mut self, id: &str, value: &str) {
        self.eval(&format!(
            "(() => {{ const e = document.getElementById({}); e.value = {}; \
             e.dispatchEvent(new Event('input')); return true; }})()",
            json!(id),
            json!(value)
        ));
    }

    /// The last answer once it is no longer streaming: its state, text,
    /// note and stored content.
    fn last_answer(&mut self, seconds: u64) -> Value {
        self.wait_for(
            "(() => { const a = [...document.querySelectorAll('.assistant')].pop(); \
             return !!a && a.dataset.state !== 'streaming'; })()",
            seconds,
        );
        self.eval(LAST_ANSWER)
    }
}

/// What the last answer shows, and what the page stored for it.
const LAST_ANSWER: &str = "(() => { const a = [...document.querySelectorAll('.assistant')].pop(); \
    const turns = JSON.parse(localStorage.getItem('ee-chat-v1')).turns; \
    return {state: a.dataset.state, chunks: Number(a.dataset.chunks || 0), \
            text: a.querySelector('.text').textContent, html: a.querySelector('.text').innerHTML, \
            note: (a.querySelector('.note') || {}).textContent || '', \
            wire: a.querySelector('.wire').textContent, \
            content: turns[turns.length - 1].content}; })()";

/// The proxy's own answer to `messages`, for comparison with the page's.
fn proxy_answer(proxy: &ServerProcess, messages: Value, max_tokens: u64) -> String {
    let r = proxy.post_json(
        "/v1/chat/completions",
        &json!({"messages": messages, "temperature": 0, "max_tokens": max_tokens}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned()
}

#[test]
fn the_chat_page_works_in_headless_chromium() {
    let pair = encrypt_real_model(&KeySource::Generate);
    let server = ServerProcess::start(&pair.server_artifact, &[]);
    let proxy = ServerProcess::proxy(&pair.bundle.dir, &server.url());
    let page = format!("{}/", proxy.url());

    // The page and its assets come with a strict Content-Security-Policy.
    let r = proxy.request("GET", "/", &[], "").unwrap();
    assert!(r.body.contains("EE private chat"));
    assert_eq!(
        r.header("content-security-policy"),
        Some(ee_client::proxy::page::CONTENT_SECURITY_POLICY)
    );
    for name in ["chat.js", "chat.css", "marked.js", "purify.js"] {
        let r = proxy
            .request("GET", &format!("/assets/{name}"), &[], "")
            .unwrap();
        assert_eq!(r.status, 200, "{name}");
    }
    assert_eq!(
        proxy
            .request("GET", "/assets/nope.js", &[], "")
            .unwrap()
            .status,
        404
    );

    let mut browser = Browser::start();
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 900, "height": 700, "deviceScaleFactor": 1, "mobile": false}),
    );
    browser.open(&page);
    assert_eq!(browser.eval("document.title"), json!("EE private chat"));

    // 1. An answer streams in and is exactly the proxy's answer.
    let question = "Write a short poem about the ocean.";
    let expected = proxy_answer(&proxy, json!([{"role": "user", "content": question}]), 256);
    browser.ask(question);
    let mut partials = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let seen = browser.eval(
            "(() => { const a = document.querySelector('.assistant'); \
             return a ? {state: a.dataset.state, text: a.querySelector('.text').textContent} : null; })()",
        );
        if seen["state"] != "streaming" && !seen.is_null() {
            break;
        }
        if let Some(t) = seen["text"].as_str().filter(|t| !t.is_empty()) {
            partials.insert(t.to_owned());
        }
        assert!(Instant::now() < deadline, "no answer: {seen}");
        std::thread::sleep(Duration::from_millis(15));
    }
    let last = browser.last_answer(5);
    // This poem runs to the page's 256 max tokens, and is marked so.
    assert_eq!(last["state"], "cut", "{last}");
    assert_eq!(last["content"], json!(expected));
    assert!(last["chunks"].as_u64().unwrap() > 10, "{last}");
    assert!(
        partials.len() >= 2,
        "the answer did not stream: {partials:?}"
    );
    // Tokens per second, and what the server saw: encrypted IDs only.
    let note = last["note"].as_str().unwrap();
    assert!(
        note.contains(" tokens · ") && note.contains("tok/s"),
        "{note}"
    );
    let wire = last["wire"].as_str().expect("wire");
    assert!(wire.starts_with("server received "), "{wire}");
    assert!(!wire.contains("ocean"), "{wire}");
    // Auto-scroll kept the end in view.
    assert_eq!(
        browser.eval("window.innerHeight + window.scrollY >= document.body.scrollHeight - 100"),
        json!(true)
    );
    browser.screenshot("answer-light.png");

    // 2. Markdown: a code block, rendered, with a copy button.
    browser.ask("Write a Python function that adds two numbers.");
    let last = browser.last_answer(180);
    assert_eq!(last["state"], "done", "{last}");
    assert!(last["content"].as_str().unwrap().contains("```"), "{last}");
    assert_eq!(
        browser.eval(
            "(() => { const a = [...document.querySelectorAll('.assistant')].pop(); \
             return !!a.querySelector('pre code') && !!a.querySelector('pre .copy') && \
             !a.querySelector('.text').textContent.includes('```'); })()"
        ),
        json!(true),
        "{last}"
    );
    browser.screenshot("code-light.png");

    // 3. Model output cannot inject markup or script.
    let rendered = browser.eval(
        "window.eeChat.renderMarkdown('<img src=x onerror=\"window.pwned=1\"> \
         <script>window.pwned=2</script> **bold** [link](javascript:window.pwned=3) \
         <a href=\"javascript:void(0)\" onclick=\"window.pwned=4\">x</a>')",
    );
    let rendered = rendered.as_str().unwrap();
    assert!(rendered.contains("<strong>bold</strong>"), "{rendered}");
    for bad in [
        "onerror",
        "<script",
        "javascript:",
        "onclick",
        "<input",
        "<form",
        "id=",
    ] {
        assert!(!rendered.contains(bad), "{bad} in {rendered}");
    }
    // Even unsanitized markup put into the page could not run: the policy
    // refuses inline handlers and scripts.
    browser.eval(
        "document.getElementById('log').insertAdjacentHTML('beforeend', \
         '<img src=\"data:,x\" onerror=\"window.pwned=1\"><div id=\"shadow\" onclick=\"window.pwned=2\"></div>'); \
         document.getElementById('shadow').click(); true",
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(browser.eval("window.pwned === undefined"), json!(true));
    // And an answer's markup cannot stand in for a control: a forged
    // max-tokens field in the log is not the one the page reads.
    let forged =
        browser.eval("window.eeChat.renderMarkdown('<input id=\"max-tokens\" value=\"8192\">')");
    assert_eq!(forged, json!(""));
    browser.eval("document.getElementById('shadow').remove(); true");

    // 4. Stop: the answer ends where it got to and stays in the chat.
    browser.set("max-tokens", "400");
    browser.ask("Write a long story about a dragon.");
    browser.wait_for(
        "Number([...document.querySelectorAll('.assistant')].pop().dataset.chunks) > 5",
        120,
    );
    browser.eval("document.getElementById('stop').click(); true");
    let last = browser.last_answer(10);
    assert_eq!(last["state"], "stopped", "{last}");
    assert!(!last["content"].as_str().unwrap().is_empty(), "{last}");
    assert!(last["note"].as_str().unwrap().contains("stopped"), "{last}");
    assert_eq!(
        browser.eval(
            "document.getElementById('send').disabled || !document.getElementById('stop').hidden"
        ),
        json!(false)
    );

    // 5. Cut by max tokens: marked.
    browser.set("max-tokens", "5");
    browser.ask("Tell me about Paris.");
    let last = browser.last_answer(60);
    assert_eq!(last["state"], "cut", "{last}");
    assert!(
        last["note"]
            .as_str()
            .unwrap()
            .contains("cut off at max tokens"),
        "{last}"
    );

    // 6. A failed request stays on screen, with the question, and retry
    // answers it.
    let before = browser.eval("document.querySelectorAll('.msg').length");
    browser.set("max-tokens", "0");
    browser.ask("What is the capital of France?");
    let last = browser.last_answer(30);
    assert_eq!(last["state"], "error", "{last}");
    assert!(
        last["note"].as_str().unwrap().contains("max_tokens"),
        "{last}"
    );
    assert_eq!(
        browser.eval("document.querySelectorAll('.msg').length"),
        json!(before.as_u64().unwrap() + 2)
    );
    browser.screenshot("failed-light.png");
    browser.set("max-tokens", "24");
    browser.eval("[...document.querySelectorAll('.retry')].pop().click(); true");
    let last = browser.last_answer(60);
    assert_eq!(last["state"], "done", "{last}");
    assert!(
        last["content"].as_str().unwrap().contains("Paris"),
        "{last}"
    );

    // 7. A reload keeps the conversation and the settings.
    let shown = browser.eval("document.getElementById('log').textContent");
    browser.open(&page);
    assert_eq!(
        browser.eval("document.getElementById('log').textContent"),
        shown
    );
    assert_eq!(
        browser.eval("document.getElementById('max-tokens').value"),
        json!("24")
    );

    // 8. A system prompt, in a new chat, is sent as the proxy would.
    browser.eval("document.getElementById('reset').click(); true");
    assert_eq!(
        browser.eval("document.querySelectorAll('.msg').length"),
        json!(0)
    );
    let system = "You are a pirate. Answer like one.";
    browser.set("system", system);
    browser.set("max-tokens", "48");
    browser.ask("Who are you?");
    let expected = proxy_answer(
        &proxy,
        json!([{"role": "system", "content": system}, {"role": "user", "content": "Who are you?"}]),
        48,
    );
    let last = browser.last_answer(60);
    assert_eq!(last["content"], json!(expected), "{last}");

    // 9. Dark mode follows the system setting.
    browser.call(
        "Emulation.setEmulatedMedia",
        json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
    );
    assert_eq!(
        browser.eval("getComputedStyle(document.body).backgroundColor"),
        json!("rgb(21, 25, 30)")
    );
    browser.open(&page);
    browser.screenshot("answer-dark.png");
}
