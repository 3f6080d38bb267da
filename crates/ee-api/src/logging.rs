//! Logs of the binaries, to stderr: text with colour only on a terminal
//! (never ANSI codes in a file or `docker logs`), or one JSON object a line
//! for log collectors (`EE_LOG_FORMAT=json`). `RUST_LOG` sets the levels.

use std::io::IsTerminal;

/// Starts logging; `default` is the level filter when `RUST_LOG` is unset.
/// `EE_LOG_FORMAT` is `text` (the default) or `json`; another value is
/// reported on stderr and text is used.
pub fn init(default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match std::env::var("EE_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().init(),
        other => {
            if let Ok(v) = other {
                if v != "text" {
                    eprintln!("EE_LOG_FORMAT={v:?} is not text or json; logging text");
                }
            }
            builder.with_ansi(std::io::stderr().is_terminal()).init()
        }
    }
}
