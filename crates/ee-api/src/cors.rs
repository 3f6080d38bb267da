//! CORS for browser clients, off unless origins are configured.

use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

/// A CORS layer allowing `origins` (`*` for any) to call with GET and POST
/// and any headers, answering preflight `OPTIONS` requests; `None` when no
/// origin is allowed (the default), as browsers then block cross-origin
/// calls.
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(Any),
    )
}
