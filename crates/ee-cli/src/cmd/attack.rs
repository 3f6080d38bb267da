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
    /// The operator with a hidden-tier artifact (an encoder's, or a chat
    /// model's `--tier hidden`) and its public base model: recover the
    /// residual-channel permutation σ by matching sorted slices of a
    /// tensor σ moves (position-embedding columns; FFN down-projection rows).
    ChannelMatch(ChannelMatchArgs),
    /// The operator facing a private fine-tune: simulate fine-tunes of the
    /// base at several sizes, encrypt each with a fresh key, and match rows
    /// to their nearest base row.
    PrivateWeights(PrivateWeightsArgs),
    /// A passive observer of the traffic (ciphertext only): generate chats
    /// with the public model, encrypt them with a fresh key, and recover the
    /// key by frequency analysis, then hill climbing, random sampling and a
    /// genetic search with the public model's statistics as the prior, at
    /// several traffic volumes.
    Frequency(super::attack_traffic::FrequencyArgs),
    /// Anyone who can query the server: one-token prompts of encrypted IDs,
    /// their top log-probabilities matched against the public model's, the
    /// alternatives each answer lists, and two-token prompts of IDs named.
    Fingerprint(FingerprintArgs),
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
    /// Simulate a hidden-channel key on top: permute the artifact rows'
    /// channels with a random σ before the attack sees them.
    #[arg(long)]
    permute_channels: bool,
    /// Where to write the recovered mapping.
    #[arg(long)]
    out: PathBuf,
    /// The true key, to print the score (the attack itself never reads it).
    #[arg(long)]
    key: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ChannelMatchArgs {
    /// The public base model (a checkpoint directory).
    #[arg(long)]
    base: PathBuf,
    /// The server artifact (hidden tier).
    #[arg(long)]
    artifact: PathBuf,
    /// Where to write the recovered σ: a JSON array indexed by encrypted
    /// channel, each entry the plaintext channel or null.
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
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    rank: u32,
    /// Seeds the simulated fine-tunes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Simulate the hidden tier too: each fine-tune's channels get a random
    /// permutation, which the attack recovers from sorted embedding columns
    /// before matching rows.
    #[arg(long)]
    hidden: bool,
}

#[derive(Args)]
pub(crate) struct FingerprintArgs {
    /// The public base model.
    #[arg(long)]
    base: PathBuf,
    /// The server artifact (queried in-process, as the API would answer).
    #[arg(long)]
    artifact: PathBuf,
    /// Numbers of queries (distinct encrypted IDs, chosen at random).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    queries: Vec<usize>,
    /// Log-probabilities per answer (OpenAI's `top_logprobs` allows 20).
    #[arg(long, default_value_t = 20)]
    top_k: usize,
    /// The true key, for the score (the attack never reads it).
    #[arg(long)]
    key: PathBuf,
    /// Where to write the mapping of the largest query budget.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seeds the order in which IDs are queried.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
pub(crate) struct ScoreArgs {
    /// A mapping written by an attack's `--out`.
    #[arg(long)]
    map: PathBuf,
    /// The true key.
    #[arg(long)]
    key: PathBuf,
    /// The model's vocabulary size (the map must cover it exactly).
    #[arg(long)]
    vocab: usize,
}

pub(crate) fn run(command: AttackCommand) -> Result<()> {
    match command {
        AttackCommand::WeightMatch(args) => weight_match_cmd(args),
        AttackCommand::ChannelMatch(args) => channel_match_cmd(args),
        AttackCommand::PrivateWeights(args) => private_weights(args),
        AttackCommand::Frequency(args) => super::attack_traffic::frequency(args),
        AttackCommand::Fingerprint(args) => fingerprint(args),
        AttackCommand::Score(args) => {
            let map = RecoveredMap::load(&args.map)?;
            if map.0.len() != args.vocab {
                anyhow::bail!(
                    "{} maps {} IDs; the vocabulary has {}",
                    args.map.display(),
                    map.0.len(),
                    args.vocab
                );
            }
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

fn read_rows(path: &std::path::Path) -> Result<VocabRows> {
    VocabRows::read(path)
        .with_context(|| format!("reading the vocabulary rows of {}", path.display()))
}

fn weight_match_cmd(args: WeightMatchArgs) -> Result<()> {
    if args.permute_channels && !args.sorted {
        anyhow::bail!(
            "--permute-channels rewrites the rows' values, so their stored bytes no longer \
             compare with the base's: use it with --sorted"
        );
    }
    let base = read_rows(&args.base)?;
    let mut artifact = read_rows(&args.artifact)?;
    if args.permute_channels {
        let sigma = Key::generate()?.vocab_permutation(artifact.embedding.dim as u32);
        let sigma: Vec<usize> = (0..sigma.len() as u32)
            .map(|i| sigma.encrypt(i).unwrap_or(i) as usize)
            .collect();
        artifact = artifact.with_channels_permuted(&sigma);
    }
    let started = Instant::now();
    let map = match args.sorted {
        true => weight_match::sorted(&base, &artifact),
        false => weight_match::exact(&base, &artifact)?,
    };
    let secs = started.elapsed().as_secs_f64();
    map.save(&args.out)?;
    println!(
        "weight-match ({}): {} of {} encrypted IDs mapped in {secs:.2} s; written to {}",
        if args.sorted {
            "sorted values"
        } else {
            "stored bytes"
        },
        map.guessed(),
        map.0.len(),
        args.out.display()
    );
    if let Some(key) = &args.key {
        print_score(&map, key)?;
    }
    Ok(())
}

fn channel_match_cmd(args: ChannelMatchArgs) -> Result<()> {
    let started = Instant::now();
    let (name, along) = ee_lab::channel_match::residual_tensor(&args.base)?;
    let sigma = ee_lab::channel_match::recover_channels(&args.base, &args.artifact, name, along)?;
    let secs = started.elapsed().as_secs_f64();
    let found = sigma.iter().filter(|c| c.is_some()).count();
    std::fs::write(&args.out, serde_json::to_vec(&sigma)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "channel-match ({name}, {along:?}): {found} of {} hidden channels mapped in {secs:.2} s; \
         written to {}",
        sigma.len(),
        args.out.display()
    );
    if let Some(key) = &args.key {
        let key_path = key;
        let key = Key::load(key).with_context(|| format!("loading {}", key.display()))?;
        let truth = true_residual_permutation(&args.artifact, key_path, &key, sigma.len())?;
        let correct = (0..sigma.len() as u32)
            .filter(|&c| sigma[c as usize].is_some_and(|p| truth.decrypt(c) == Some(p)))
            .count();
        println!(
            "recovered {correct} of {} ({:.2}%), {} wrong",
            sigma.len(),
            100.0 * correct as f64 / sigma.len().max(1) as f64,
            found - correct
        );
    }
    Ok(())
}

/// The σ the key applied to `artifact`: none at the vocabulary tier (as
/// the bundle beside `key_path` records it, when there is one), else value
/// by value on a Hugging Face checkpoint, within quantized runs on a GGUF.
fn true_residual_permutation(
    artifact: &std::path::Path,
    key_path: &std::path::Path,
    key: &Key,
    n: usize,
) -> Result<ee_core::Permutation> {
    use ee_core::bundle::Tier;
    use ee_core::transform::channels::{residual_permutation, Axis};
    let bundle = key_path.parent().map(ee_core::ClientBundle::load);
    if let Some(Ok(b)) = bundle {
        if b.manifest.tier == Tier::Vocab {
            return Ok(ee_core::Permutation::identity(n as u32));
        }
    }
    if artifact.is_dir() {
        return Ok(residual_permutation(key, n as u32));
    }
    let mut file =
        std::fs::File::open(artifact).with_context(|| format!("opening {}", artifact.display()))?;
    let header = ee_core::gguf::GgufHeader::read(&mut file)?;
    let mut plan = ee_core::transform::gguf_hidden_plan(&header, key)?;
    plan.perms
        .of(Axis::Residual, n)?
        .cloned()
        .context("the residual axis has no permutation")
}

fn print_score(map: &RecoveredMap, key: &std::path::Path) -> Result<()> {
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
        if base.head.is_some() {
            " (+ untied head)"
        } else {
            " (tied head)"
        }
    );
    println!("| fine-tune | δ | recovered | wrong | seconds |");
    println!("|---|---|---|---|---|");
    let mut results = Vec::new();
    for &delta in &args.deltas {
        for kind in [
            Perturbation::Noise,
            Perturbation::LowRank(args.rank as usize),
        ] {
            // The lab's own key: the scorer reads it, the attack never does.
            let lab_key = Key::generate()?;
            let key = lab_key.vocab_permutation(n as u32);
            let mut artifact = private_artifact(&base, &key, delta, kind, args.seed);
            let dim = base.embedding.dim;
            let sigma = lab_key.permutation_for("ee/lab/sigma", dim as u32);
            let sigma: Vec<usize> = (0..dim as u32)
                .map(|i| sigma.encrypt(i).unwrap_or(i) as usize)
                .collect();
            if args.hidden {
                artifact = artifact.with_channels_permuted(&sigma);
            }
            let started = Instant::now();
            let mut channels = None;
            if args.hidden {
                let got = ee_lab::nearest::recover_channels(&base.embedding, &artifact.embedding)?;
                channels = Some(got.iter().zip(&sigma).filter(|(g, s)| g == s).count());
                artifact = ee_lab::nearest::unpermute_channels(&artifact, &got);
            }
            let map = nearest(&base, &artifact)?;
            let secs = started.elapsed().as_secs_f64();
            let s = Score::of(&map, &key, &[]);
            let channels_shown = channels.map_or(String::new(), |c| format!(" (σ: {c} of {dim})"));
            println!(
                "| {kind} | {delta} | {:.2}%{channels_shown} | {} | {secs:.1} |",
                100.0 * s.vocab_recovered(),
                s.vocab_wrong
            );
            results.push(json!({"fine_tune": kind.to_string(), "delta": delta,
                                "hidden": args.hidden, "channels_recovered": channels,
                                "recovered": s.vocab_recovered(), "score": s, "seconds": secs}));
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({
                "attack": "private-weights", "base": args.base, "vocab": n, "results": results
            }))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn fingerprint(args: FingerprintArgs) -> Result<()> {
    use ee_lab::fingerprint::{match_fingerprints, random_pairs, top_answers, Alternatives};
    let public = ee_engine::load(&args.base)?;
    let server = ee_engine::load(&args.artifact)?;
    let n = public.vocab_size();
    let k = args.top_k;
    let key = Key::load(&args.key)
        .with_context(|| format!("loading {}", args.key.display()))?
        .vocab_permutation(n as u32);
    let started = Instant::now();
    let single = |ids: &[u32]| ids.iter().map(|&t| vec![t]).collect::<Vec<_>>();
    let all: Vec<u32> = (0..n as u32).collect();
    let public_answers = top_answers(public.as_ref(), &single(&all), k)?;
    let values = |a: &[Vec<(u32, f32)>]| -> Vec<f32> {
        a.iter().flat_map(|x| x.iter().map(|&(_, v)| v)).collect()
    };
    let public_fp = values(&public_answers);
    println!(
        "public answers after all {n} tokens: {:.0} s (the attacker's own machine)",
        started.elapsed().as_secs_f64()
    );
    // The attacker queries encrypted IDs in a random order it picks.
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&args.seed.to_le_bytes());
    let order = Key::from_bytes(seed).vocab_permutation(n as u32);
    let order: Vec<u32> = (0..n as u32).filter_map(|i| order.encrypt(i)).collect();
    println!(
        "| queries | recovered among queried | vocabulary: shapes | + their alternatives | \
         + as many two-token queries | wrong | seconds |"
    );
    println!("|---|---|---|---|---|---|---|");
    let most = args.queries.iter().copied().max().unwrap_or(0);
    for &q in &args.queries {
        let queried = &order[..q.min(n)];
        let t = Instant::now();
        let answers = top_answers(server.as_ref(), &single(queried), k)?;
        let shapes = match_fingerprints(queried, &values(&answers), &public_fp, k, n)?;
        // Each answer lists k more IDs, at the ranks the public model lists
        // its alternatives after the matched token.
        let mut alternatives = Alternatives::default();
        for (c, answer) in queried.iter().zip(&answers) {
            if let Some(t) = shapes.0[*c as usize] {
                alternatives.add(answer, &public_answers[t as usize]);
            }
        }
        let mut listed = shapes.clone();
        alternatives.fill(&mut listed);
        // As many two-token prompts of IDs already named, in random pairs:
        // their alternatives follow contexts no single token gives.
        let named: Vec<u32> = (0..n as u32)
            .filter(|&c| listed.0[c as usize].is_some())
            .collect();
        let pairs = random_pairs(&named, queried.len(), args.seed);
        let cipher: Vec<Vec<u32>> = pairs.iter().map(|p| p.to_vec()).collect();
        let plain: Vec<Vec<u32>> = pairs
            .iter()
            .map(|p| p.iter().filter_map(|&c| listed.0[c as usize]).collect())
            .collect();
        let pair_answers = top_answers(server.as_ref(), &cipher, k)?;
        for (answer, public_answer) in
            pair_answers
                .iter()
                .zip(top_answers(public.as_ref(), &plain, k)?)
        {
            alternatives.add(answer, &public_answer);
        }
        let mut paired = listed.clone();
        alternatives.fill(&mut paired);
        let secs = t.elapsed().as_secs_f64();
        let of_vocab = |m: &RecoveredMap| 100.0 * Score::of(m, &key, &[]).vocab_recovered();
        let s = Score::of(&shapes, &key, &[]);
        println!(
            "| {} | {:.1}% | {:.2}% | {:.2}% | {:.2}% | {} | {secs:.1} |",
            queried.len(),
            100.0 * s.vocab_correct as f64 / queried.len().max(1) as f64,
            of_vocab(&shapes),
            of_vocab(&listed),
            of_vocab(&paired),
            Score::of(&paired, &key, &[]).vocab_wrong,
        );
        if let (Some(out), true) = (&args.out, q == most) {
            paired.save(out)?;
        }
    }
    Ok(())
}
