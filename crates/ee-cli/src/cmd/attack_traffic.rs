//! `ee attack frequency`: the passive observer's traffic (chats with the
//! public model, generated through the engine's scheduler and cached) and
//! the attacks on it (`ee_lab::frequency`, `ee_lab::search`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use ee_client::model_tool::ModelText;
use ee_client::template::{ChatFormat, ChatMessage};
use ee_core::Key;
use ee_engine::SamplingParams;
use ee_lab::Score;
use serde_json::json;

use crate::default_model;

#[derive(Args)]
pub(crate) struct FrequencyArgs {
    /// The public model (the victim's model too).
    #[arg(long, default_value_os_t = default_model())]
    model: PathBuf,
    /// Traffic volumes N (tokens the observer has seen).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    tokens: Vec<usize>,
    /// Tokens the attacker samples from the public model for its prior.
    #[arg(long, default_value_t = 20_000)]
    prior_tokens: usize,
    /// Hill-climbing proposals per attack.
    #[arg(long, default_value_t = 300_000)]
    moves: usize,
    /// Annealing start temperature (see `ee_lab::frequency::Climb`).
    #[arg(long, default_value_t = 2.0)]
    temperature: f64,
    /// Full evaluations of the traffic's likelihood for random sampling
    /// and for the genetic search (see `ee_lab::search`).
    #[arg(long, default_value_t = 300)]
    evaluations: usize,
    /// Seeds the chats' sampling and the searches.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the generated chats (plaintext IDs) in this file and reuse them
    /// when it holds enough: generating 10^6 tokens takes a while.
    #[arg(long)]
    traffic: Option<PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Chats with the public model on `prompts` in turn (seeded sampling at
/// 0.7, as a chat client would), until `tokens` tokens: each transcript is
/// the rendered prompt and the answer, plaintext IDs. They run 32 at a time
/// through the engine's scheduler; a chat's tokens depend only on its
/// prompt and seed, not on the batch.
fn chats(
    text: &ModelText,
    model: &Arc<dyn ee_engine::CausalLm>,
    prompts: &[&str],
    tokens: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    use ee_engine::{Scheduler, SchedulerConfig, SequenceEvent, SequenceRequest};
    const IN_FLIGHT: usize = 64;
    let (codec, template) = text.chat(ChatFormat::default())?;
    let scheduler = Scheduler::start(
        model.clone(),
        SchedulerConfig {
            max_batch: 32,
            max_queue: IN_FLIGHT,
            step_token_budget: 2048,
            prompt_cache_bytes: 0,
            ..SchedulerConfig::default()
        },
    );
    let mut next = prompts.iter().cycle().enumerate();
    let mut in_flight = std::collections::VecDeque::new();
    let (mut out, mut total) = (Vec::new(), 0);
    while total < tokens {
        // Enough chats in flight to reach `tokens` at the mean length so
        // far, and no more: any beyond would be generated for nothing.
        let mean = total.checked_div(out.len()).unwrap_or(150).max(1);
        while in_flight.len() < IN_FLIGHT && total + in_flight.len() * mean < tokens {
            let (i, prompt) = next.next().context("no prompts")?;
            let ids = template.prompt_ids(&codec, &[ChatMessage::new("user", prompt)], true)?;
            let request = SequenceRequest {
                prompt: ids.clone(),
                sampling: SamplingParams {
                    temperature: 0.7,
                    seed: Some(seed.wrapping_mul(1_000_003).wrapping_add(i as u64)),
                    ..SamplingParams::default()
                },
                max_tokens: 256,
                stop_token_ids: text.special.stop_ids.clone(),
                top_logprobs: None,
                cache_prompt: false,
            };
            in_flight.push_back((ids, scheduler.submit(request)?));
        }
        let (mut ids, mut events) = in_flight.pop_front().context("a chat in flight")?;
        loop {
            match events.blocking_recv() {
                Some(SequenceEvent::Token(s)) => ids.push(s.token),
                Some(SequenceEvent::Finished { .. }) => break,
                Some(SequenceEvent::Failed(e)) => anyhow::bail!("a chat failed: {e}"),
                None => anyhow::bail!("the engine stopped"),
            }
        }
        total += ids.len();
        out.push(ids);
    }
    Ok(out)
}

/// Chats as plaintext token IDs, one transcript each.
type Transcripts = Vec<Vec<u32>>;

/// The victim's and the attacker's chats: read from `--traffic` when it
/// holds enough chats made the same way (model, seed, prompts), else
/// generated and written there (plaintext IDs; the lab's own file). Chats
/// depend only on their index, so a longer run's first chats are a
/// shorter run's.
fn traffic(
    args: &FrequencyArgs,
    text: &ModelText,
    model: &Arc<dyn ee_engine::CausalLm>,
) -> Result<(Transcripts, Transcripts)> {
    use ee_lab::prompts::{ATTACKER, VICTIM};
    let most = args.tokens.iter().copied().max().unwrap_or(0);
    let made = json!({
        "model": args.model, "seed": args.seed,
        "victim_prompts": VICTIM, "attacker_prompts": ATTACKER,
    });
    // The first whole chats that reach `n` tokens, if there are enough.
    let first = |v: &[Vec<u32>], n: usize| -> Option<Transcripts> {
        let mut total = 0;
        let count = v.iter().take_while(|t| {
            let more = total < n;
            total += t.len();
            more
        });
        let taken: Transcripts = count.cloned().collect();
        (taken.iter().map(Vec::len).sum::<usize>() >= n).then_some(taken)
    };
    if let Some(path) = args.traffic.as_ref().filter(|p| p.exists()) {
        let read = || -> Result<(serde_json::Value, Transcripts, Transcripts)> {
            let file: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
            let victim = serde_json::from_value(file["victim"].clone())?;
            let prior = serde_json::from_value(file["prior"].clone())?;
            Ok((file["made"].clone(), victim, prior))
        };
        let (how, victim, prior) = read().with_context(|| format!("reading {}", path.display()))?;
        match (
            how == made,
            first(&victim, most),
            first(&prior, args.prior_tokens),
        ) {
            (true, Some(victim), Some(prior)) => {
                println!("traffic read from {}", path.display());
                return Ok((victim, prior));
            }
            (false, ..) => println!(
                "{} holds chats made otherwise (model, seed or prompts); generating anew",
                path.display()
            ),
            _ => println!("{} holds too few chats; generating anew", path.display()),
        }
    }
    let started = Instant::now();
    let victim = chats(text, model, &VICTIM, most, args.seed)?;
    let prior = chats(
        text,
        model,
        &ATTACKER,
        args.prior_tokens,
        args.seed ^ 0xa77a,
    )?;
    println!(
        "generated {} victim and {} prior tokens in {:.0} s",
        victim.iter().map(Vec::len).sum::<usize>(),
        prior.iter().map(Vec::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.traffic {
        let file = json!({"made": made, "victim": victim, "prior": prior});
        std::fs::write(path, serde_json::to_vec(&file)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((victim, prior))
}

/// What the observer knows without the key, from the public template and
/// the ciphertext alone: every transcript opens with the template's fixed
/// tokens (aligned position by position), and the encrypted ID that most
/// often ends a transcript is the end-of-turn marker.
fn known_plaintext(text: &ModelText, traffic: &[Vec<u32>]) -> Result<Vec<(u32, u32)>> {
    let (codec, template) = text.chat(ChatFormat::default())?;
    let render = |s: &str| template.prompt_ids(&codec, &[ChatMessage::new("user", s)], true);
    let (a, b) = (render("alpha")?, render("omega")?);
    let opening: Vec<u32> = a
        .iter()
        .zip(&b)
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| *x)
        .collect();
    let mut known = std::collections::BTreeMap::new();
    for cipher in traffic {
        for (c, p) in cipher.iter().zip(&opening) {
            known.insert(*c, *p);
        }
    }
    let mut last: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for c in traffic.iter().filter_map(|t| t.last()) {
        *last.entry(*c).or_default() += 1;
    }
    if let (Some((&c, _)), Some(&stop)) = (
        last.iter()
            .max_by_key(|&(c, n)| (*n, std::cmp::Reverse(*c))),
        text.special.stop_ids.first(),
    ) {
        known.entry(c).or_insert(stop);
    }
    Ok(known.into_iter().collect())
}

pub(crate) fn frequency(args: FrequencyArgs) -> Result<()> {
    use ee_lab::frequency::{frequency_match, hill_climb, BigramModel, Climb};
    use ee_lab::search::{genetic, random_sampling, Budget};
    let text = ModelText::read(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let model = ee_engine::load(&args.model)?;
    let vocab = model.vocab_size();
    let (victim, prior_text) = traffic(&args, &text, &model)?;
    let prior = BigramModel::train(&prior_text, vocab);
    // The lab's own key: only the scorer reads it.
    let key = Key::generate()?.vocab_permutation(vocab as u32);
    let encrypted: Vec<Vec<u32>> = victim
        .iter()
        .map(|t| key.encrypt_all(t))
        .collect::<Result<_, _>>()?;
    println!("| N | known plaintext | method | token accuracy | beyond the known | distinct right / wrong / seen | contest score | seconds |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    for &n in &args.tokens {
        // Whole transcripts, up to N tokens.
        let mut take = 0;
        let mut count = 0;
        while take < encrypted.len() && count < n {
            count += encrypted[take].len();
            take += 1;
        }
        let traffic = &encrypted[..take];
        let flat: Vec<u32> = traffic.concat();
        for with_known in [false, true] {
            let known = match with_known {
                true => known_plaintext(&text, traffic)?,
                false => Vec::new(),
            };
            // Accuracy beyond what the attacker was given.
            let unknown: Vec<u32> = flat
                .iter()
                .copied()
                .filter(|c| !known.iter().any(|k| k.0 == *c))
                .collect();
            let t = Instant::now();
            let ranked = frequency_match(traffic, &prior, &known, vocab);
            let ranked_secs = t.elapsed().as_secs_f64();
            let climb = Climb {
                moves: args.moves,
                temperature: args.temperature,
                seed: args.seed,
            };
            let climbed = hill_climb(traffic, &prior, ranked.clone(), &known, climb);
            let climbed_secs = t.elapsed().as_secs_f64() - ranked_secs;
            let budget = Budget {
                evaluations: args.evaluations,
                seed: args.seed,
            };
            let t = Instant::now();
            let sampled = random_sampling(traffic, &prior, ranked.clone(), &known, budget);
            let sampled_secs = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let bred = genetic(traffic, &prior, ranked.clone(), &known, budget);
            let bred_secs = t.elapsed().as_secs_f64();
            for (method, map, secs) in [
                ("frequency", &ranked, ranked_secs),
                ("+ hill climbing", &climbed, climbed_secs),
                ("+ random sampling", &sampled, sampled_secs),
                ("+ genetic search", &bred, bred_secs),
            ] {
                let s = Score::of(map, &key, &flat);
                let beyond = Score::of(map, &key, &unknown).traffic_token_accuracy;
                println!(
                    "| {} | {} | {method} | {:.1}% | {:.1}% | {} / {} / {} | {} | {secs:.1} |",
                    flat.len(),
                    if with_known { "template" } else { "none" },
                    100.0 * s.traffic_token_accuracy,
                    100.0 * beyond,
                    s.traffic_distinct_correct,
                    s.traffic_distinct_wrong,
                    s.traffic_distinct_total,
                    s.contest_score
                );
                results.push(json!({"tokens": flat.len(), "known_plaintext": with_known,
                                    "method": method, "score": s,
                                    "accuracy_beyond_known": beyond, "seconds": secs}));
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&json!({
                "attack": "frequency", "model": args.model, "vocab": vocab,
                "prior_tokens": prior_text.iter().map(Vec::len).sum::<usize>(),
                "moves": args.moves, "temperature": args.temperature,
                "evaluations": args.evaluations, "results": results
            }))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
