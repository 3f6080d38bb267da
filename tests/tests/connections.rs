//! Stalled and idle connections are closed, on the server and the proxy:
//! a client that sends half its headers, stops part-way through a body, or
//! keeps a connection open and silent, cannot hold it (and a file
//! descriptor) forever.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ee_client::model_tool::KeySource;
use ee_e2e::{encrypt_real_model, ServerProcess};

/// Whether the peer has closed `stream` (EOF or reset) within `wait`.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response; keep reading
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// 20 half-sent requests, one idle keep-alive connection and one request
/// whose body stalls are all closed after the 1 s header-read timeout (the
/// stalled body answered 408), and the service still answers.
fn stalled_and_idle_connections_close(addr: SocketAddr) {
    let mut stalled_body = TcpStream::connect(addr).unwrap();
    stalled_body
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"prompt\": \"",
        )
        .unwrap();
    let mut stalled: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    for s in &mut stalled {
        assert!(
            closed_within(s, Duration::from_secs(5)),
            "a stalled connection stayed open"
        );
    }
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)),
        "an idle connection stayed open"
    );
    stalled_body
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = stalled_body.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("request_timeout"),
        "a stalled body got: {answer:?}"
    );
    let r = ee_e2e::http_request(addr, "GET", "/health", &[], b"").unwrap();
    assert_eq!(r.status, 200);
}

/// A body sent a byte at a time, each pause inside the 1 s limit, is cut
/// off at the whole-body deadline (4 s) with a 408.
fn a_trickling_body_is_cut_off(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n",
        )
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let started = std::time::Instant::now();
    let trickle = std::thread::spawn(move || {
        while started.elapsed() < Duration::from_secs(12) {
            if writer.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = [0u8; 12];
    let read = stream.read_exact(&mut answer);
    let waited = started.elapsed();
    drop(stream);
    trickle.join().unwrap();
    assert!(read.is_ok(), "no answer to a trickling body");
    assert_eq!(&answer, b"HTTP/1.1 408");
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_secs(8),
        "cut off after {waited:?}"
    );
}

#[test]
fn the_server_closes_stalled_and_idle_connections() {
    let pair = encrypt_real_model(&KeySource::Identity);
    let server = ServerProcess::start(
        &pair.server_artifact,
        &[("EE_HEADER_READ_TIMEOUT_SECS", "1")],
    );
    stalled_and_idle_connections_close(server.addr);
    a_trickling_body_is_cut_off(server.addr);
}

#[test]
fn the_proxy_closes_stalled_and_idle_connections() {
    let pair = encrypt_real_model(&KeySource::Identity);
    // No server behind it: the proxy's own connections are what count.
    let proxy = ServerProcess::proxy_with(
        &pair.bundle.dir,
        "http://127.0.0.1:9",
        &["--header-read-timeout-secs", "1"],
    );
    stalled_and_idle_connections_close(proxy.addr);
    a_trickling_body_is_cut_off(proxy.addr);
}
