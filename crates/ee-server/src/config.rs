//! Server settings: defaults, then `config/server.toml`-style TOML, then
//! `EE_*` environment variables, then command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ee_engine::KvCacheDtype;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The server artifact (an EE-transformed .gguf or artifact directory).
    pub model: Option<PathBuf>,
    /// The names the model answers to (vLLM's `--served-model-name`): all
    /// are listed in `/v1/models` and accepted as `model`; the first is
    /// the one responses name.
    pub served_model_names: Vec<String>,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Deepest JSON nesting accepted.
    pub max_json_depth: usize,
    /// Seconds a request may run before it is cancelled.
    pub request_timeout_secs: u64,
    /// Bearer keys; empty (and no key file) means no authentication.
    pub api_keys: Vec<String>,
    /// A file with one API key per line.
    pub api_key_file: Option<PathBuf>,
    /// Origins allowed by CORS; `["*"]` for any; empty disables CORS.
    pub cors_allowed_origins: Vec<String>,
    /// Sequences decoding together.
    pub max_batch: usize,
    /// Sequences waiting for a slot before requests get 429.
    pub max_queue: usize,
    /// What one forward step may cost (decode and prefill chunks), in
    /// tokens at the start of a context; deeper tokens cost more.
    pub step_token_budget: usize,
    /// MiB of KV cache the running sequences may hold together, granted in
    /// blocks as they grow; when it runs out, blocks granted ahead of need
    /// are taken back, and failing that the youngest is preempted.
    pub kv_cache_mib: usize,
    /// The KV cache's element type, `f16` or `f32` (llama.cpp's
    /// `--cache-type-k/-v`, vLLM's `--kv-cache-dtype`).
    pub kv_cache_dtype: KvCacheDtype,
    /// MiB of prompt caches kept for requests that extend them and ask
    /// (`cache_prompt`); 0 keeps none.
    pub prompt_cache_mib: usize,
    /// Tokens per forward pass of an encoder (embeddings, classification):
    /// queued requests are packed together up to this.
    pub encoder_batch_tokens: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Largest `logprobs` / `top_logprobs`.
    pub max_logprobs: usize,
    /// Completion tokens when a request sets no `max_tokens`; 0 runs to
    /// the end of the context.
    pub default_max_tokens: usize,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C;
    /// then, or at a second signal, the server exits anyway.
    pub shutdown_drain_secs: u64,
    /// Seconds a client may take to send a request's headers (or an idle
    /// keep-alive connection may wait for its next request) before the
    /// connection is closed; also the longest pause inside a request body
    /// (then 408).
    pub header_read_timeout_secs: u64,
    /// Serve a model that still carries what only a client may keep (a
    /// tokenizer, special-token IDs): a plaintext model, not an artifact.
    pub allow_plaintext: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8000".parse().expect("static address"),
            model: None,
            served_model_names: vec!["ee-model".into()],
            max_body_bytes: 4 << 20,
            max_json_depth: 32,
            request_timeout_secs: 600,
            api_keys: Vec::new(),
            api_key_file: None,
            cors_allowed_origins: Vec::new(),
            max_batch: 16,
            max_queue: 256,
            step_token_budget: 512,
            kv_cache_mib: 4096,
            kv_cache_dtype: KvCacheDtype::F16,
            prompt_cache_mib: 1024,
            encoder_batch_tokens: 8192,
            max_n: 16,
            max_logprobs: 20,
            default_max_tokens: 2048,
            shutdown_drain_secs: 30,
            header_read_timeout_secs: 30,
            allow_plaintext: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("environment variable {0}: {1}")]
    Env(&'static str, String),
}

impl ServerConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse(path.into(), e))
    }

    /// Applies `EE_*` overrides from `env` (a lookup, so tests need not
    /// touch the process environment).
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(name: &'static str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.trim()
                .parse()
                .map_err(|e: T::Err| ConfigError::Env(name, e.to_string()))
        }
        let list = |v: String| {
            v.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        if let Some(v) = env("EE_LISTEN") {
            self.listen = parse("EE_LISTEN", &v)?;
        }
        if let Some(v) = env("EE_MODEL") {
            self.model = Some(v.into());
        }
        if env("EE_MODEL_ID").is_some() {
            return Err(ConfigError::Env(
                "EE_MODEL_ID",
                "renamed: set EE_SERVED_MODEL_NAMES (one name or several, comma-separated)".into(),
            ));
        }
        if let Some(v) = env("EE_SERVED_MODEL_NAMES") {
            self.served_model_names = list(v);
        }
        if let Some(v) = env("EE_API_KEYS") {
            self.api_keys = list(v);
        }
        if let Some(v) = env("EE_API_KEY_FILE") {
            self.api_key_file = Some(v.into());
        }
        if let Some(v) = env("EE_CORS_ALLOWED_ORIGINS") {
            self.cors_allowed_origins = list(v);
        }
        for (name, slot) in [
            ("EE_MAX_BODY_BYTES", &mut self.max_body_bytes),
            ("EE_MAX_BATCH", &mut self.max_batch),
            ("EE_MAX_QUEUE", &mut self.max_queue),
            ("EE_STEP_TOKEN_BUDGET", &mut self.step_token_budget),
            ("EE_KV_CACHE_MIB", &mut self.kv_cache_mib),
            ("EE_PROMPT_CACHE_MIB", &mut self.prompt_cache_mib),
            ("EE_ENCODER_BATCH_TOKENS", &mut self.encoder_batch_tokens),
            ("EE_DEFAULT_MAX_TOKENS", &mut self.default_max_tokens),
        ] {
            if let Some(v) = env(name) {
                *slot = parse(name, &v)?;
            }
        }
        if let Some(v) = env("EE_KV_CACHE_DTYPE") {
            self.kv_cache_dtype = parse("EE_KV_CACHE_DTYPE", &v)?;
        }
        if let Some(v) = env("EE_ALLOW_PLAINTEXT") {
            self.allow_plaintext = parse("EE_ALLOW_PLAINTEXT", &v)?;
        }
        if let Some(v) = env("EE_SHUTDOWN_DRAIN_SECS") {
            self.shutdown_drain_secs = parse("EE_SHUTDOWN_DRAIN_SECS", &v)?;
        }
        if let Some(v) = env("EE_HEADER_READ_TIMEOUT_SECS") {
            self.header_read_timeout_secs = parse("EE_HEADER_READ_TIMEOUT_SECS", &v)?;
        }
        if let Some(v) = env("EE_REQUEST_TIMEOUT_SECS") {
            self.request_timeout_secs = parse("EE_REQUEST_TIMEOUT_SECS", &v)?;
        }
        Ok(())
    }

    /// Every accepted API key: the configured ones and the key file's lines.
    pub fn load_api_keys(&self) -> Result<Vec<String>, ConfigError> {
        let mut keys = self.api_keys.clone();
        if let Some(path) = &self.api_key_file {
            let text =
                std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.clone(), e))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_parses_and_env_overrides_it() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/server.toml");
        let mut c = ServerConfig::from_file(&path).unwrap();
        c.apply_env(|k| match k {
            "EE_LISTEN" => Some("127.0.0.1:9999".into()),
            "EE_API_KEYS" => Some("a, b".into()),
            "EE_MAX_BATCH" => Some("3".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.api_keys, vec!["a", "b"]);
        assert_eq!(c.max_batch, 3);
        assert_eq!(c.kv_cache_dtype, KvCacheDtype::F16);
        assert!(c
            .apply_env(|k| (k == "EE_MAX_QUEUE").then(|| "many".into()))
            .is_err());
        c.apply_env(|k| (k == "EE_KV_CACHE_DTYPE").then(|| "F32".into()))
            .unwrap();
        assert_eq!(c.kv_cache_dtype, KvCacheDtype::F32);
        let e = c
            .apply_env(|k| (k == "EE_KV_CACHE_DTYPE").then(|| "q8_0".into()))
            .unwrap_err();
        assert!(e.to_string().contains("EE_KV_CACHE_DTYPE"), "{e}");
        let f32: ServerConfig = toml::from_str("kv_cache_dtype = \"f32\"").unwrap();
        assert_eq!(f32.kv_cache_dtype, KvCacheDtype::F32);
        assert!(toml::from_str::<ServerConfig>("kv_cache_dtype = \"f8\"").is_err());
    }

    #[test]
    fn unknown_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, "listne = \"1.2.3.4:5\"\n").unwrap();
        assert!(ServerConfig::from_file(&path).is_err());
    }
}
