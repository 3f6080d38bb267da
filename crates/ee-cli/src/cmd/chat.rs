//! `ee chat`: a terminal chat with a blind server, streaming; or one answer
//! to a prompt given as an argument.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use ee_client::proxy::request::translate;
use ee_client::session::Session;
use ee_client::template::ChatFormat;
use ee_client::template::ChatMessage;
use ee_client::upstream::Endpoint;
use serde_json::{json, Map, Value};

use crate::SamplingArgs;

#[derive(Args)]
pub(crate) struct ChatArgs {
    /// The client bundle.
    #[arg(long)]
    bundle: PathBuf,
    /// Base URL of the blind server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    server: String,
    /// How conversations become prompts: `llama-cpp` (plain ChatML for
    /// ChatML models, as llama.cpp's server) or `gguf` (the shipped template).
    #[arg(long, value_enum, default_value_t = ChatFormat::LlamaCpp)]
    chat_format: ChatFormat,
    /// Bearer key for the blind server, if it wants one.
    #[arg(long, env = "EE_API_KEY")]
    api_key: Option<String>,
    /// Ask this once and exit; without it, chat interactively.
    prompt: Option<String>,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

impl ChatArgs {
    fn request(&self, history: &[ChatMessage]) -> Map<String, Value> {
        let s = &self.sampling;
        let mut body = json!({
            "messages": history,
            "max_tokens": self.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repetition_penalty": s.repetition_penalty,
        });
        if let Some(seed) = s.seed {
            body["seed"] = json!(seed);
        }
        match body {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// Streams one answer to stdout and returns its text.
async fn answer(session: &Session, body: &Map<String, Value>) -> Result<String> {
    let request = match translate(&session.keys, Endpoint::Chat, body) {
        Ok(r) => r,
        Err(e) => bail!("{}", e.message),
    };
    let mut generation = session.generate(&request).await?;
    let mut stdout = std::io::stdout();
    while let Some(deltas) = generation.next().await? {
        for (_, delta) in deltas {
            write!(stdout, "{}", delta.text)?;
            stdout.flush()?;
        }
    }
    writeln!(stdout)?;
    Ok(generation.decoders[0].output.clone())
}

pub(crate) fn run(args: ChatArgs) -> Result<()> {
    let session = super::proxy::session(
        &args.bundle,
        args.chat_format,
        &args.server,
        args.api_key.clone(),
        Default::default(),
    )?;
    let mut history: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        session.server_model().await?;
        if let Some(prompt) = &args.prompt {
            history.push(ChatMessage::new("user", prompt));
            answer(&session, &args.request(&history)).await?;
            return Ok(());
        }
        let interactive = std::io::stdin().is_terminal();
        if interactive {
            eprintln!(
                "Chatting with {} (encrypted). Empty line: skip; Ctrl-D: quit.",
                session.upstream.base_url()
            );
        }
        let mut lines = std::io::stdin().lock().lines();
        loop {
            if interactive {
                eprint!("> ");
            }
            let Some(line) = lines.next().transpose()? else {
                return Ok(());
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            history.push(ChatMessage::new("user", line));
            let reply = answer(&session, &args.request(&history)).await?;
            history.push(ChatMessage::new("assistant", &reply));
        }
    })
}
