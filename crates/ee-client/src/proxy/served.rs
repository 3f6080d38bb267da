//! The proxy's own names for the model (`--served-model-name`, as vLLM's
//! flag): checked and applied to each request in one place.

use super::request::{invalid, RequestError, Translated};

/// The machine-readable code of a request for a model not served here.
pub const MODEL_NOT_FOUND: &str = "model_not_found";

/// Applies the proxy's own model names (`--served-model-name`, as vLLM's):
/// the client must ask for one of them (or none), the answer echoes it (or
/// the first), and the server is asked for the model it hosts.
///
/// # Errors
/// Another name, with [`MODEL_NOT_FOUND`].
pub fn apply_served_names(request: &mut Translated, served: &[String]) -> Result<(), RequestError> {
    let Some(first) = served.first() else {
        return Ok(());
    };
    match &request.model {
        Some(m) if !served.contains(m) => {
            let mut e = invalid(
                "model",
                format!("model {m:?} is not served here; this proxy serves {served:?}"),
            );
            e.code = Some(MODEL_NOT_FOUND);
            return Err(e);
        }
        Some(_) => {}
        None => request.model = Some(first.clone()),
    }
    request.upstream.set_model(None);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::request::tests::tiny_keys;
    use crate::proxy::request::translate;
    use crate::upstream::{Endpoint, UpstreamRequest};
    use serde_json::json;

    #[test]
    fn names_are_checked_echoed_and_not_forwarded() {
        let (_dir, keys) = tiny_keys();
        let ask = |model: Option<&str>| {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
            if let Some(m) = model {
                body["model"] = json!(m);
            }
            translate(&keys, Endpoint::Chat, body.as_object().unwrap()).unwrap()
        };
        let served = ["a".to_owned(), "b".to_owned()];
        let forwarded = |r: &Translated| match &r.upstream {
            UpstreamRequest::Chat(c) => c.model.clone(),
            UpstreamRequest::Completion(c) => c.model.clone(),
        };
        let mut r = ask(Some("b"));
        apply_served_names(&mut r, &served).unwrap();
        assert_eq!((r.model.as_deref(), forwarded(&r)), (Some("b"), None));
        let mut r = ask(None);
        apply_served_names(&mut r, &served).unwrap();
        assert_eq!(r.model.as_deref(), Some("a"));
        let mut r = ask(Some("c"));
        let e = apply_served_names(&mut r, &served).unwrap_err();
        assert_eq!(
            (e.param.as_deref(), e.code),
            (Some("model"), Some(MODEL_NOT_FOUND))
        );
        // No names: the request is left as the client sent it.
        let mut r = ask(Some("c"));
        apply_served_names(&mut r, &[]).unwrap();
        assert_eq!(forwarded(&r).as_deref(), Some("c"));
    }
}
