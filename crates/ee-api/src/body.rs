//! A whole-body deadline. tower-http's body timeout bounds each pause in a
//! request body; a client that sends one byte just inside every pause would
//! still hold its connection for as long as it liked. This bounds the whole
//! body instead, counted from when the request's headers arrived.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// The error a body past its deadline yields ([`crate::read_json`] answers
/// it 408).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive whole in time")]
pub struct BodyDeadlineExceeded;

/// `inner`, failing with [`BodyDeadlineExceeded`] once `deadline` has
/// passed before it ends.
pub struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
}

impl DeadlineBody {
    pub fn new(inner: Body, deadline: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(deadline)),
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if self.inner.is_end_stream() {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(axum::Error::new(BodyDeadlineExceeded))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_that_never_ends_fails_at_its_deadline_and_a_whole_one_reads() {
        let (_tx, never) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let stalled = Body::new(http_body_util::StreamBody::new(tokio_stream_from(never)));
        let body = Body::new(DeadlineBody::new(stalled, Duration::from_millis(50)));
        let err = axum::body::to_bytes(body, 1024).await.unwrap_err();
        assert!(
            crate::http::caused_by::<BodyDeadlineExceeded>(&err),
            "{err}"
        );

        let whole = Body::new(DeadlineBody::new(
            Body::from("{}"),
            Duration::from_millis(50),
        ));
        assert_eq!(axum::body::to_bytes(whole, 1024).await.unwrap(), "{}");
    }

    /// A stream over a receiver (no tokio-stream dependency for one test).
    fn tokio_stream_from<T>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
