//! Reading request bodies, naming responses, and stopping.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

use http_body_util::LengthLimitError;
use tower_http::timeout::TimeoutError;

use crate::body::BodyDeadlineExceeded;
use crate::ApiError;

/// Whether `T` is anywhere in `e`'s chain of sources.
pub(crate) fn caused_by<T: std::error::Error + 'static>(
    e: &(dyn std::error::Error + 'static),
) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<T>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Reads a JSON body: content type, size and nesting checked first, so each
/// failure gets its own status (415, 413, 400) and the envelope; a body that
/// stalls or trickles past [`crate::serve`]'s body limits is a 408.
pub async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    max_bytes: usize,
    max_depth: usize,
) -> Result<T, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiError::unsupported_media_type());
    }
    let bytes = axum::body::to_bytes(body, max_bytes).await.map_err(|e| {
        if caused_by::<TimeoutError>(&e) || caused_by::<BodyDeadlineExceeded>(&e) {
            ApiError::body_timeout()
        } else if caused_by::<LengthLimitError>(&e) {
            ApiError::too_large(max_bytes)
        } else {
            ApiError::bad_request(format!("reading the request body failed: {e}"))
        }
    })?;
    let depth = json_depth(&bytes);
    if depth > max_depth {
        return Err(ApiError::bad_request(format!(
            "JSON nested {depth} deep; the limit is {max_depth}"
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
}

/// The deepest `[`/`{` nesting in a JSON text, strings skipped. Checked
/// before parsing, so a deeply nested body cannot exhaust the parser.
pub fn json_depth(body: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Seconds since the Unix epoch: the `created` of OpenAI's envelopes.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id in OpenAI's shape, `{prefix}-{24 hex digits}`
/// (`chatcmpl-…`, `cmpl-…`), random from the OS.
pub fn response_id(prefix: &str) -> String {
    let random = ee_core::rng::os_random_bytes().unwrap_or_default();
    format!("{prefix}-{}", hex::encode(&random[..12]))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_skips_strings() {
        assert_eq!(json_depth(br#"{"a": [[1]], "b": "[[[[[["}"#), 3);
        assert_eq!(json_depth(br#"{"a": "\"[["}"#), 1);
    }

    #[test]
    fn response_ids_are_prefixed_and_distinct() {
        let (a, b) = (response_id("chatcmpl"), response_id("chatcmpl"));
        assert!(a.starts_with("chatcmpl-") && a.len() == "chatcmpl-".len() + 24);
        assert_ne!(a, b);
    }
}
