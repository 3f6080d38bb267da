//! CORS for browser clients, off unless origins are configured.

use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

/// Checks configured origins at startup: `*`, or `scheme://host[:port]`
/// each, so a typo is an error rather than an origin silently never
/// allowed.
pub fn check_origins(origins: &[String]) -> Result<(), String> {
    for o in origins.iter().map(|o| o.trim()) {
        let well_formed = o == "*"
            || (o.split_once("://").is_some_and(|(scheme, host)| {
                matches!(scheme, "http" | "https") && !host.is_empty() && !host.contains('/')
            }) && HeaderValue::from_str(o).is_ok());
        if !well_formed {
            return Err(format!(
                "CORS origin {o:?} is not * or scheme://host[:port] (as in http://localhost:3000)"
            ));
        }
    }
    Ok(())
}

/// A CORS layer allowing `origins` (`*` for any) to call with GET and POST
/// and any headers, answering preflight `OPTIONS` requests; `None` when no
/// origin is allowed (the default), as browsers then block cross-origin
/// calls.
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim()).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(Any),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_trimmed_and_typos_refused() {
        let ok = [
            " http://a.example".to_owned(),
            "https://b.example:8443".into(),
            "*".into(),
        ];
        assert!(check_origins(&ok).is_ok());
        assert!(cors_layer(&ok).is_some());
        assert!(cors_layer(&[]).is_none());
        for bad in ["a.example", "http://", "ftp://a", "http://a/path"] {
            let err = check_origins(&[bad.to_owned()]).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
