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
use ee_core::wire::FinishReason;
use nix::sys::termios::{tcflush, tcgetattr, tcsetattr, FlushArg, LocalFlags, SetArg, Termios};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;
use serde_json::{json, Map, Value};
use tokio::signal::unix::{signal, Signal, SignalKind};

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
    /// The longest answer, in tokens. Default: 512, or what the context
    /// has left, whichever is less.
    #[arg(long)]
    max_tokens: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

impl ChatArgs {
    fn request(&self, history: &[ChatMessage]) -> Map<String, Value> {
        let s = &self.sampling;
        let mut body = json!({
            "messages": history,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": s.min_p,
            "repetition_penalty": s.repetition_penalty,
        });
        if let Some(seed) = s.seed {
            body["seed"] = json!(seed);
        }
        if let Some(n) = self.max_tokens {
            body["max_tokens"] = json!(n);
        }
        match body {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ended {
    /// The model stopped, or ran into `max_tokens` (`Length`).
    Finished(Option<FinishReason>),
    /// Ctrl-C: the rest was cancelled (dropping the generation closes the
    /// server stream, which stops the server's work).
    Stopped,
}

/// Resolves at the next Ctrl-C when there is a listener, else never (Ctrl-C
/// then ends the program, as usual).
async fn ctrl_c(interrupts: Option<&mut Signal>) {
    match interrupts {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Streams one answer to stdout and returns its text and how it ended; a
/// cut-off or stopped answer is marked on stderr. With `interrupts`, Ctrl-C
/// stops the answer, at any point, instead of the program.
async fn answer(
    session: &Session,
    body: &Map<String, Value>,
    interrupts: Option<&mut Signal>,
) -> Result<(String, Ended)> {
    let request = match translate(&session.keys, Endpoint::Chat, body) {
        Ok(r) => r,
        Err(e) => bail!("{}", e.message),
    };
    let stop = ctrl_c(interrupts);
    tokio::pin!(stop);
    let mut stdout = std::io::stdout();
    let mut generation = tokio::select! {
        _ = &mut stop => {
            writeln!(stdout)?;
            eprintln!("[stopped]");
            return Ok((String::new(), Ended::Stopped));
        }
        g = session.generate(&request) => g?,
    };
    let ended = loop {
        let next = tokio::select! {
            _ = &mut stop => break Ended::Stopped,
            next = generation.next() => next?,
        };
        let Some(deltas) = next else {
            break Ended::Finished(generation.decoders[0].finish);
        };
        for (_, delta) in deltas {
            write!(stdout, "{}", delta.text)?;
            stdout.flush()?;
        }
    };
    writeln!(stdout)?;
    match ended {
        Ended::Stopped => eprintln!("[stopped]"),
        Ended::Finished(Some(FinishReason::Length)) => {
            eprintln!("[cut off: the answer reached its max tokens]")
        }
        Ended::Finished(_) => {}
    }
    Ok((generation.decoders[0].output.clone(), ended))
}

/// While it lives, keys typed on the terminal are not echoed into the
/// streaming answer; on drop, the terminal is restored and what was typed
/// meanwhile is discarded. Ctrl-C still signals (ISIG stays on).
struct NoEcho(Option<Termios>);

impl NoEcho {
    fn new() -> Self {
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut quiet = saved.clone();
        quiet
            .local_flags
            .remove(LocalFlags::ECHO | LocalFlags::ICANON);
        match tcsetattr(&stdin, SetArg::TCSANOW, &quiet) {
            Ok(()) => Self(Some(saved)),
            Err(_) => Self(None),
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let stdin = std::io::stdin();
            let _ = tcflush(&stdin, FlushArg::TCIFLUSH);
            let _ = tcsetattr(&stdin, SetArg::TCSANOW, saved);
        }
    }
}

/// The interactive loop: line editing and in-memory history (rustyline;
/// nothing is written to disk, since the conversation is the private
/// part), Ctrl-C stops an answer or clears the line, Ctrl-D quits.
fn chat_on_terminal(
    runtime: &tokio::runtime::Runtime,
    session: &Session,
    args: &ChatArgs,
    history: &mut Vec<ChatMessage>,
) -> Result<()> {
    eprintln!(
        "Chatting with {} (encrypted). Ctrl-C stops an answer; Ctrl-D quits.",
        session.upstream.base_url()
    );
    let mut editor = DefaultEditor::new()?;
    // One listener for the whole chat, so that no Ctrl-C during an answer
    // is missed; at the prompt rustyline reads Ctrl-C as a key instead.
    let mut interrupts = {
        let _guard = runtime.enter();
        signal(SignalKind::interrupt())?
    };
    loop {
        let line = match editor.readline("> ") {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line);
        history.push(ChatMessage::new("user", line));
        let quiet = NoEcho::new();
        let result = runtime.block_on(answer(
            session,
            &args.request(history),
            Some(&mut interrupts),
        ));
        drop(quiet);
        match result {
            // Stopped before a word: the question goes too, so that two
            // questions never stand in a row.
            Ok((reply, Ended::Stopped)) if reply.is_empty() => {
                history.pop();
            }
            // A stopped answer stays in the conversation as far as it got,
            // as llama.cpp's CLI keeps it.
            Ok((reply, _)) => history.push(ChatMessage::new("assistant", &reply)),
            // The conversation survives a failed turn; the turn is dropped.
            Err(e) => {
                eprintln!("error: {e:#}");
                history.pop();
            }
        }
    }
}

/// `ee chat`'s answer length when `--max-tokens` is not given (cut to what
/// the context leaves).
const DEFAULT_MAX_TOKENS: usize = 512;

pub(crate) fn run(args: ChatArgs) -> Result<()> {
    let mut session = super::proxy::session(
        &args.bundle,
        args.chat_format,
        &args.server,
        args.api_key.clone(),
        Default::default(),
    )?;
    session.default_max_tokens = Some(DEFAULT_MAX_TOKENS);
    let mut history: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(session.server_model())?;
    if let Some(prompt) = &args.prompt {
        history.push(ChatMessage::new("user", prompt));
        runtime.block_on(answer(&session, &args.request(&history), None))?;
        return Ok(());
    }
    if std::io::stdin().is_terminal() {
        return chat_on_terminal(&runtime, &session, &args, &mut history);
    }
    // Piped input: one turn per line.
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        history.push(ChatMessage::new("user", line));
        let (reply, _) = runtime.block_on(answer(&session, &args.request(&history), None))?;
        history.push(ChatMessage::new("assistant", &reply));
    }
    Ok(())
}
