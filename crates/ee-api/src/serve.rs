//! Serving a router with the connection limit `axum::serve` lacks: it
//! starts hyper without a timer, so a client that sends half its headers
//! and stalls holds a connection (and a file descriptor) forever, and a few
//! thousand such clients lock everyone out. llama.cpp's server closes them.
//!
//! Here each HTTP/1 connection gets hyper's header-read timeout, which also
//! bounds how long an idle keep-alive connection may wait for its next
//! request, and each request body the same limit on any pause between its
//! pieces (tower-http's body timeout) plus a deadline for the whole body
//! ([`ConnectionLimits::body_deadline`]), so a request whose headers are
//! complete and whose body stalls or trickles is answered 408 by
//! [`crate::read_json`] and closed. Accept errors are logged and retried, and on shutdown the
//! listener closes and in-flight connections finish.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::body::DeadlineBody;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's headers, counted from
    /// when the connection is ready for a request: a stalled half-request,
    /// or an idle keep-alive connection, is closed after this. It is also
    /// the longest pause allowed inside a request body.
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    /// 30 s, hyper's own default once a timer is set.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    /// How long a whole request body may take, from its headers: four
    /// header-read timeouts (2 minutes by default), so a client that sends
    /// a byte just inside every pause is still cut off.
    pub fn body_deadline(&self) -> Duration {
        self.header_read_timeout * 4
    }

    /// Limits from a setting in seconds, as the server config and the
    /// proxy's flag give it.
    ///
    /// # Errors
    /// 0, which would close every connection at once; the message names
    /// `setting`.
    pub fn from_secs(header_read_timeout_secs: u64, setting: &str) -> Result<Self, String> {
        if header_read_timeout_secs == 0 {
            return Err(format!("{setting} must be at least 1 second"));
        }
        Ok(Self {
            header_read_timeout: Duration::from_secs(header_read_timeout_secs),
        })
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting and waits for open connections to finish (a caller that wants
/// a deadline races this with one).
///
/// # Errors
/// None today: accept failures are logged and retried.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let whole_body = limits.body_deadline();
    let app = app
        .layer(axum::middleware::map_request(
            move |r: Request| async move { r.map(|b| Body::new(DeadlineBody::new(b, whole_body))) },
        ))
        .layer(RequestBodyTimeoutLayer::new(limits.header_read_timeout));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // A connection reset before it was accepted: nothing to do.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    // Usually EMFILE: back off rather than spin or exit.
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        // No HTTP upgrades: no route uses them, and hyper-util's graceful
        // shutdown does not watch upgradeable connections.
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
