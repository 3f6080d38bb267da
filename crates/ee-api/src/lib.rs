//! `ee-api`: the OpenAI-compatible HTTP layer both sides of EE speak.
//!
//! The blind server and the client proxy each serve an OpenAI-shaped API,
//! and the proxy is also a client of the server's. What they share lives
//! here, once:
//! - [`ApiError`]: OpenAI's error envelope with its HTTP status;
//! - [`read_json`]: a JSON body, its content type, size and depth checked;
//! - [`sse`]: server-sent events out ([`sse::response`]) and in
//!   ([`sse::EventBuffer`]);
//! - [`response_id`] and [`unix_now`] for response envelopes;
//! - [`shutdown_signal`]: Ctrl-C or SIGTERM;
//! - [`cors_layer`]: CORS for browser clients, off by default;
//! - [`logging::init`]: the binaries' logs, text or JSON;
//! - [`serve::serve`]: a router served with header-read, idle and
//!   request-body timeouts.
//!
//! The request and response bodies themselves are `ee_core::wire`'s types:
//! plain data, with no HTTP in them.

pub mod body;
mod cors;
mod error;
mod http;
pub mod logging;
pub mod serve;
pub mod sse;

pub use cors::{check_origins, cors_layer};
pub use error::ApiError;

/// The response header in which the blind server names its artifact's
/// fingerprint on every response, so the key holder can refuse a server
/// re-deployed with another artifact behind the same address.
pub const ARTIFACT_HEADER: &str = "x-ee-artifact-sha256";
pub use http::{json_depth, read_json, response_id, shutdown_signal, unix_now};
