//! The chat page at `/` and its assets under `/assets/`, compiled into the
//! binary: the page loads nothing from anywhere else. Its scripts are the
//! page's own plus two vendored libraries (`web/README.md`): marked for
//! Markdown and DOMPurify to strip anything executable from model output.
//! A Content-Security-Policy allows scripts from the proxy only, so even
//! markup that slipped through could not run.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ee_api::ApiError;

const CHAT_HTML: &str = include_str!("web/chat.html");

/// Scripts and styles from this origin only; no inline script or event
/// handler, no plugins, no framing, forms post only here, and
/// `connect-src 'self'` keeps the page talking to this proxy.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `GET /`: the page.
pub async fn chat_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        CHAT_HTML,
    )
        .into_response()
}

/// `GET /assets/{name}`: one of the page's scripts or its style sheet.
pub async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "chat.js" => (include_str!("web/chat.js"), "text/javascript"),
        "chat.css" => (include_str!("web/chat.css"), "text/css"),
        "marked.js" => (include_str!("web/marked.umd.js"), "text/javascript"),
        "purify.js" => (include_str!("web/purify.min.js"), "text/javascript"),
        _ => return ApiError::not_found(format!("no asset {name:?}")).into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The binary is the version: a new one may change them.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
