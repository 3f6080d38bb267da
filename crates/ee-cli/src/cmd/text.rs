//! The plaintext text tools, for users debugging a model's tokenizer and
//! template: `ee tokenize`, `ee detokenize` (llama.cpp's `llama-tokenize`)
//! and `ee render-chat` (transformers' `apply_chat_template(tokenize=False)`).
//! They read a GGUF (vocabulary-only ones too), a checkpoint directory or a
//! client bundle, and never talk to a server.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use ee_client::model_tool::ModelText;
use ee_client::template::{ChatFormat, ChatInput, ChatTemplate};
use ee_core::ClientBundle;
use serde_json::Value;

/// Where the tokenizer comes from.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct Source {
    /// A GGUF file (a vocabulary-only one will do) or a Hugging Face
    /// checkpoint directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A client bundle directory.
    #[arg(long)]
    bundle: Option<PathBuf>,
}

impl Source {
    fn read(&self) -> Result<ModelText> {
        match (&self.model, &self.bundle) {
            (Some(model), _) => {
                ModelText::read(model).with_context(|| format!("reading {}", model.display()))
            }
            (None, Some(dir)) => {
                let bundle = ClientBundle::load(dir)
                    .with_context(|| format!("loading the bundle {}", dir.display()))?;
                Ok(ModelText::from_bundle(&bundle)?)
            }
            (None, None) => bail!("give --model or --bundle (or, to render-chat, --template)"),
        }
    }
}

#[derive(Args)]
pub(crate) struct TokenizeArgs {
    #[command(flatten)]
    source: Source,
    /// Do not add the model's BOS token.
    #[arg(long)]
    no_bos: bool,
    /// Tokenize special-token text (`<|im_end|>`) as plain text.
    #[arg(long)]
    no_parse_special: bool,
    /// Print only the IDs, as a JSON array.
    #[arg(long, conflicts_with = "pieces")]
    ids: bool,
    /// Print only the vocabulary pieces, as a JSON array.
    #[arg(long)]
    pieces: bool,
    /// The text; standard input when absent.
    text: Option<String>,
}

pub(crate) fn tokenize(args: TokenizeArgs) -> Result<()> {
    let text = args.source.read()?;
    let codec = text.codec()?;
    let input = match args.text {
        Some(t) => t,
        None => read_stdin()?,
    };
    let ids = codec.encode_with(&input, !args.no_bos, !args.no_parse_special)?;
    let mut out = std::io::stdout().lock();
    if args.ids {
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    } else if args.pieces {
        let pieces: Vec<Option<String>> = ids.iter().map(|&id| codec.piece(id)).collect();
        writeln!(out, "{}", serde_json::to_string(&pieces)?)?;
    } else {
        // llama-tokenize's listing: one `ID -> 'piece'` per line.
        for id in ids {
            let piece = String::from_utf8_lossy(&codec.token_bytes(id)).into_owned();
            writeln!(out, "{id:>6} -> {}", serde_json::to_string(&piece)?)?;
        }
    }
    Ok(())
}

#[derive(Args)]
pub(crate) struct DetokenizeArgs {
    #[command(flatten)]
    source: Source,
    /// Token IDs, separated by spaces or commas, or one JSON array; standard
    /// input when absent.
    ids: Vec<String>,
}

pub(crate) fn detokenize(args: DetokenizeArgs) -> Result<()> {
    let codec = args.source.read()?.codec()?;
    let input = match args.ids.is_empty() {
        true => read_stdin()?,
        false => args.ids.join(" "),
    };
    let ids = input
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']'))
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("{t:?} is not a token ID"))
        })
        .collect::<Result<Vec<u32>>>()?;
    // Exactly the text, no newline added, so it pipes back unchanged.
    print!("{}", codec.decode_with_specials(&ids)?);
    std::io::stdout().flush()?;
    Ok(())
}

#[derive(Args)]
pub(crate) struct RenderChatArgs {
    /// A Jinja chat template file.
    #[arg(long, conflicts_with_all = ["model", "bundle"])]
    template: Option<PathBuf>,
    /// A GGUF or checkpoint directory whose shipped template to render.
    #[arg(long, conflicts_with = "bundle")]
    model: Option<PathBuf>,
    /// A client bundle whose template to render.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// With --model or --bundle: `llama-cpp` renders a ChatML model as
    /// plain ChatML, as the proxy does by default; `gguf` renders the
    /// shipped template.
    #[arg(long, value_enum, default_value_t = ChatFormat::LlamaCpp)]
    chat_format: ChatFormat,
    /// The conversation: a JSON array of OpenAI messages (`-` for standard
    /// input).
    #[arg(long)]
    messages: PathBuf,
    /// OpenAI `tools`, a JSON array.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// Open the assistant's turn at the end.
    #[arg(long)]
    add_generation_prompt: bool,
    /// `bos_token` (default: the model's).
    #[arg(long)]
    bos_token: Option<String>,
    /// `eos_token` (default: the model's).
    #[arg(long)]
    eos_token: Option<String>,
}

pub(crate) fn render_chat(args: RenderChatArgs) -> Result<()> {
    let (source, bos, eos) = match &args.template {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            None,
            None,
        ),
        None => {
            let text = Source {
                model: args.model.clone(),
                bundle: args.bundle.clone(),
            }
            .read()?;
            let source = args
                .chat_format
                .template_source(text.chat_template.as_deref())
                .to_owned();
            (source, text.special.bos, text.special.eos)
        }
    };
    let template = ChatTemplate::new(
        &source,
        args.bos_token.as_deref().or(bos.as_deref()),
        args.eos_token.as_deref().or(eos.as_deref()),
    )?;
    let Value::Array(messages) = read_json(&args.messages)? else {
        bail!("{}: messages must be a JSON array", args.messages.display());
    };
    let tools = args.tools.as_deref().map(read_json).transpose()?;
    let rendered = template.render_input(&ChatInput {
        messages,
        tools,
        add_generation_prompt: args.add_generation_prompt,
        ..ChatInput::default()
    })?;
    print!("{rendered}");
    std::io::stdout().flush()?;
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = match path == Path::new("-") {
        true => read_stdin()?,
        false => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading standard input")?;
    Ok(s)
}
