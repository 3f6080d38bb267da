//! `ee attack ...`: the attack lab's command line (crate `ee-lab`). Each
//! attack takes only what its adversary has and writes the mapping it
//! recovered (`--out`, a JSON array indexed by encrypted ID); only the
//! scorer reads a key. The lab may run for minutes: it is a command, not a
//! test.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ee_core::Key;
use ee_lab::nearest::{nearest, private_artifact, Perturbation};
use ee_lab::rows::VocabRows;
use ee_lab::{bound, weight_match, RecoveredMap, Score};
use serde_json::json;

use crate::default_model;

#[derive(Subcommand)]
pub(crate) enum AttackCommand {
    /// The server operator with the artifact and the public base model:
    /// match the artifact's vocabulary rows to the base's.
    WeightMatch(WeightMatchArgs),
    /// The operator facing a private fine-tune: simulate fine-tunes of the
    /// base at several sizes, encrypt each with a fresh key, and match rows
    /// to their nearest base row.
    PrivateWeights(PrivateWeightsArgs),
    /// Grade a recovered mapping against the true key.
    Score(ScoreArgs),
    /// Brute force: the key space, log2(V!) bits, and why it is not the measure.
    Bound {
        /// Vocabulary size.
        #[arg(long)]
        vocab: u64,
    },
}

#[derive(Args)]
pub(crate) struct WeightMatchArgs {
    /// The public base model (GGUF or checkpoint directory).
    #[arg(long)]
    base: PathBuf,
    /// The server artifact.
    #[arg(long)]
    artifact: PathBuf,
    /// Compare sorted row values (survives a hidden-channel permutation)
    /// instead of stored bytes.
    #[arg(long)]
    sorted: bool,
    /// Where to write the recovered mapping.
    #[arg(long)]
    out: PathBuf,
    /// The true key, to print the score (the attack itself never reads it).
    #[arg(long)]
    key: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct PrivateWeightsArgs {
    /// The public base model.
    #[arg(long, default_value_os_t = default_model())]
    base: PathBuf,
    /// Fine-tune sizes δ, relative to each matrix (‖ΔW‖/‖W‖).
    #[arg(long, value_delimiter = ',', default_value = "0.001,0.01,0.05,0.2")]
    deltas: Vec<f32>,
    /// Rank of the low-rank fine-tune, measured beside i.i.d. noise.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ScoreArgs {
    /// A mapping written by an attack's `--out`.
    #[arg(long)]
    map: PathBuf,
    /// The true key.
    #[arg(long)]
    key: PathBuf,
}

pub(crate) fn run(command: AttackCommand) -> Result<()> {
    match command {
        AttackCommand::WeightMatch(args) => weight_match_cmd(args),
        AttackCommand::PrivateWeights(args) => private_weights(args),
        AttackCommand::Score(args) => {
            let map = RecoveredMap::load(&args.map)?;
            print_score(&map, &args.key)
        }
        AttackCommand::Bound { vocab } => {
            let bits = bound::log2_factorial(vocab);
            println!("key space of a vocabulary of {vocab}: log2({vocab}!) = {bits:.0} bits");
            println!(
                "(26! is {:.0} bits, and letter substitution is solved by hand: \
                 attacks never enumerate keys)",
                bound::log2_factorial(26)
            );
            Ok(())
        }
    }
}

fn read_rows(path: &PathBuf) -> Result<VocabRows> {
    VocabRows::read(path).with_context(|| format!("reading the vocabulary rows of {}", path.display()))
}

fn weight_match_cmd(args: WeightMatchArgs) -> Result<()> {
    let base = read_rows(&args.base)?;
    let artifact = read_rows(&args.artifact)?;
    let started = Instant::now();
    let map = match args.sorted {
        true => weight_match::sorted(&base, &artifact),
        false => weight_match::exact(&base, &artifact),
    };
    let secs = started.elapsed().as_secs_f64();
    map.save(&args.out)?;
    println!(
        "weight-match ({}): {} of {} encrypted IDs mapped in {secs:.2} s; written to {}",
        if args.sorted { "sorted values" } else { "stored bytes" },
        map.guessed(),
        map.0.len(),
        args.out.display()
    );
    if let Some(key) = &args.key {
        print_score(&map, key)?;
    }
    Ok(())
}

fn print_score(map: &RecoveredMap, key: &PathBuf) -> Result<()> {
    let key = Key::load(key).with_context(|| format!("loading {}", key.display()))?;
    let perm = key.vocab_permutation(map.0.len() as u32);
    let s = Score::of(map, &perm, &[]);
    println!(
        "recovered {} of {} ({:.2}%), {} wrong",
        s.vocab_correct,
        s.vocab_total,
        100.0 * s.vocab_recovered(),
        s.vocab_wrong
    );
    Ok(())
}

fn private_weights(args: PrivateWeightsArgs) -> Result<()> {
    let base = read_rows(&args.base)?;
    let n = base.vocab_size();
    println!(
        "private weights: {} vocabulary rows of width {}{}; each fine-tune gets a fresh key",
        n,
        base.embedding.dim,
        if base.head.is_some() { " (+ untied head)" } else { " (tied head)" }
    );
    println!("| fine-tune | δ | recovered | wrong | seconds |");
    println!("|---|---|---|---|---|");
    let mut results = Vec::new();
    for &delta in &args.deltas {
        for kind in [Perturbation::Noise, Perturbation::LowRank(args.rank)] {
            // The lab's own key: the scorer reads it, the attack never does.
            let key = Key::generate()?.vocab_permutation(n as u32);
            let artifact = private_artifact(&base, &key, delta, kind, args.seed);
            let started = Instant::now();
            let map = nearest(&base, &artifact)?;
            let secs = started.elapsed().as_secs_f64();
            let s = Score::of(&map, &key, &[]);
            println!(
                "| {kind} | {delta} | {:.2}% | {} | {secs:.1} |",
                100.0 * s.vocab_recovered(),
                s.vocab_wrong
            );
            results.push(json!({"fine_tune": kind.to_string(), "delta": delta,
                                "recovered": s.vocab_recovered(), "score": s, "seconds": secs}));
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&json!({
            "attack": "private-weights", "base": args.base, "vocab": n, "results": results
        }))?)
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
