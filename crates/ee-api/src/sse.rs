//! Server-sent events as OpenAI streams them: `data: {json}` events ending
//! with `data: [DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use tokio::sync::mpsc;

/// An event carrying one JSON value.
pub fn data(value: &serde_json::Value) -> Event {
    Event::default().data(value.to_string())
}

/// The stream's last event.
pub fn done() -> Event {
    Event::default().data("[DONE]")
}

/// A streaming response of the events a task sends on `rx`, with
/// keep-alive comments. When the client goes away the body is dropped, so
/// the sender sees its channel closed and can stop its work.
pub fn response(rx: mpsc::Receiver<Event>) -> Response {
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The receiving side: bytes as they arrive, split into events.
#[derive(Debug, Default)]
pub struct EventBuffer {
    buffer: Vec<u8>,
}

impl EventBuffer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event's `data:` lines, joined: `Some(None)` for an
    /// event without data (a keep-alive comment), `None` until an event is
    /// complete. Events end at a blank line, `\n\n` or `\r\n\r\n`,
    /// whichever comes first (the SSE spec allows both).
    pub fn next_event(&mut self) -> Option<Option<String>> {
        let find = |sep: &[u8]| {
            self.buffer
                .windows(sep.len())
                .position(|w| w == sep)
                .map(|i| (i, i + sep.len()))
        };
        let (end, next) = [find(b"\n\n"), find(b"\r\n\r\n")]
            .into_iter()
            .flatten()
            .min()?;
        let event = String::from_utf8_lossy(&self.buffer[..end]).into_owned();
        self.buffer.drain(..next);
        let lines: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        Some((!lines.is_empty()).then(|| lines.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_on_either_blank_line_and_comments_have_no_data() {
        let mut buf = EventBuffer::default();
        buf.push(b": keep-alive\n\ndata: {\"a\":1}\r\n\r\ndata: [DO");
        assert_eq!(buf.next_event(), Some(None));
        assert_eq!(buf.next_event(), Some(Some("{\"a\":1}".into())));
        assert_eq!(buf.next_event(), None);
        buf.push(b"NE]\n\n");
        assert_eq!(buf.next_event(), Some(Some("[DONE]".into())));
        assert_eq!(buf.next_event(), None);
    }
}
