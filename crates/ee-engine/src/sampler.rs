//! Token sampling: greedy, temperature, top-k, top-p, min-p, penalties,
//! logit bias and a seeded RNG, all **permutation-equivariant**.
//!
//! The server samples over encrypted IDs. For a seeded draw to decrypt to
//! the token the plaintext model would draw, nothing may depend on token IDs:
//! - candidates are walked in probability order, exact ties broken by a key
//!   that travels with the token (see [`crate::CausalLm::tie_keys`]);
//! - probability masses are summed as integers, so the totals do not depend
//!   on the order tokens are stored in (float sums would round differently).

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ee_core::wire::token_mask::TokenMask;

use ee_core::rng::{os_random_bytes, uniform_below};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::Error;

/// Probability masses are fixed-point with this many fractional bits. The
/// most likely token has mass exactly 2^FRAC_BITS; a token below 2^-FRAC_BITS
/// of it counts as zero, identically on every path.
const FRAC_BITS: i32 = 62;
/// How many candidates to order before falling back to a full sort.
const PREFIX: usize = 64;

/// Sampling settings of one sequence. Token IDs in `logit_bias` are in the
/// same space as the model's (encrypted on the server).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables; relative to the most likely token.
    pub min_p: f32,
    /// 1 disables; applies to prompt and generated tokens (vLLM semantics).
    pub repetition_penalty: f32,
    /// 0 disables; applies to generated tokens (OpenAI semantics).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    /// The only tokens the first draw may give (the key holder's structured
    /// output); `None`: any. Later draws are free.
    pub first_token_mask: Option<Arc<TokenMask>>,
    /// `None` seeds from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            first_token_mask: None,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks ranges; `vocab_size` bounds the logit-bias keys.
    pub fn validate(&self, vocab_size: usize) -> Result<(), Error> {
        let bad = |what: String| Err(Error::InvalidSampling(what));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if let Some(m) = &self.first_token_mask {
            if m.vocab_size() != vocab_size {
                return bad(format!(
                    "first_token_mask covers {} tokens, the vocabulary {vocab_size}",
                    m.vocab_size()
                ));
            }
        }
        for &(t, b) in &self.logit_bias {
            if t as usize >= vocab_size {
                return bad(format!(
                    "logit_bias token {t} is outside the vocabulary of {vocab_size}"
                ));
            }
            if !(-100.0..=100.0).contains(&b) {
                return bad(format!("logit_bias values must be in [-100, 100], got {b}"));
            }
        }
        Ok(())
    }
}

/// A drawn token, with its log-probabilities when they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// Log-probabilities of the penalised distribution before temperature: the
/// drawn token's and the most likely alternatives'.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Copy)]
struct Candidate {
    logit: f32,
    tie: u64,
    id: u32,
    mass: u64,
}

/// Probability order: higher logit first, exact ties by the travelling key.
/// The ID is a last resort for tokens whose weights are identical too.
fn by_probability(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit
        .total_cmp(&a.logit)
        .then(b.tie.cmp(&a.tie))
        .then(a.id.cmp(&b.id))
}

/// Orders `c[..k]` so that it holds the `k` most probable candidates, sorted.
fn order_prefix(c: &mut [Candidate], k: usize) {
    let k = k.min(c.len());
    if k == 0 {
        return;
    }
    if k < c.len() {
        c.select_nth_unstable_by(k - 1, by_probability);
    }
    c[..k].sort_unstable_by(by_probability);
}

/// Fixed-point mass of `exp(logit - max)`.
fn mass(logit: f32, max: f32, temperature: f32) -> u64 {
    let p = f64::from((logit - max) / temperature).exp();
    (p * 2f64.powi(FRAC_BITS)) as u64
}

/// Per-sequence sampler state: settings, RNG and token history.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    /// Generated-token counts, for presence/frequency penalties.
    generated: HashMap<u32, u32>,
    /// Every token seen (prompt and generated), for the repetition penalty.
    seen: HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Result<Self, Error> {
        let seed = match params.seed {
            Some(s) => {
                let mut b = [0u8; 32];
                b[..8].copy_from_slice(&s.to_le_bytes());
                b
            }
            None => os_random_bytes()?,
        };
        let seen = prompt.iter().copied().collect();
        Ok(Self {
            params,
            rng: ChaCha20Rng::from_seed(seed),
            generated: HashMap::new(),
            seen,
        })
    }

    /// Logits after logit bias and penalties.
    fn processed(&self, logits: &[f32]) -> Vec<f32> {
        let mut l = logits.to_vec();
        let p = &self.params;
        for &(t, b) in &p.logit_bias {
            if let Some(x) = l.get_mut(t as usize) {
                *x += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.generated {
                if let Some(x) = l.get_mut(t as usize) {
                    *x -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
        // A masked-out token cannot be drawn: no mass, never the maximum.
        if let (Some(mask), true) = (&p.first_token_mask, self.generated.is_empty()) {
            for (t, x) in l.iter_mut().enumerate() {
                if !mask.contains(t as u32) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        l
    }

    /// Draws the next token and records it in the history. With
    /// `logprobs: Some(n)` it also reports log-probabilities with `n`
    /// alternatives; without, greedy decoding skips the softmax entirely.
    pub fn sample(
        &mut self,
        logits: &[f32],
        tie_keys: &[u64],
        logprobs: Option<usize>,
    ) -> Result<Sampled, Error> {
        if logits.len() != tie_keys.len() || logits.is_empty() {
            return Err(Error::Model(format!(
                "{} logits for {} tie keys",
                logits.len(),
                tie_keys.len()
            )));
        }
        let l = self.processed(logits);
        let max = l
            .iter()
            .copied()
            .filter(|x| !x.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return Err(Error::Model("no finite logit to sample from".into()));
        }
        let p = &self.params;
        // Logprobs need the masses at temperature 1: computed once, and
        // reused by the draw when it samples at temperature 1 too.
        let at_t1: Option<Vec<Candidate>> =
            logprobs.map(|_| candidates(&l, tie_keys, max, Some(1.0)).collect());
        let token = if p.temperature == 0.0 || p.top_k == 1 {
            candidates(&l, tie_keys, max, None)
                .min_by(by_probability)
                .expect("max is finite, so a candidate exists")
                .id
        } else {
            let kept = match &at_t1 {
                Some(c) if p.temperature == 1.0 => c.clone(),
                _ => candidates(&l, tie_keys, max, Some(p.temperature)).collect(),
            };
            self.draw(kept)
        };
        let logprobs = logprobs
            .zip(at_t1)
            .map(|(top, mut cands)| token_logprobs(&mut cands, max, token, top));
        *self.generated.entry(token).or_insert(0) += 1;
        self.seen.insert(token);
        Ok(Sampled { token, logprobs })
    }

    /// A seeded draw among `kept` after min-p, top-k and top-p.
    fn draw(&mut self, mut kept: Vec<Candidate>) -> u32 {
        let p = &self.params;
        let min_mass = (f64::from(p.min_p) * 2f64.powi(FRAC_BITS)) as u64;
        kept.retain(|c| c.mass > 0 && c.mass >= min_mass);
        if p.top_k > 0 && p.top_k < kept.len() {
            order_prefix(&mut kept, p.top_k);
            kept.truncate(p.top_k);
        }
        // Exact integer totals: independent of storage order.
        let total: u128 = kept.iter().map(|c| u128::from(c.mass)).sum();
        let mut ordered = PREFIX.min(kept.len());
        order_prefix(&mut kept, ordered);
        let mut walk = |limit: u128, kept: &mut Vec<Candidate>| -> usize {
            // Index of the first candidate at which the cumulative mass exceeds `limit`.
            let mut cum = 0u128;
            let mut i = 0;
            loop {
                if i == ordered && ordered < kept.len() {
                    kept[ordered..].sort_unstable_by(by_probability);
                    ordered = kept.len();
                }
                cum += u128::from(kept[i].mass);
                if cum > limit || i + 1 == kept.len() {
                    return i;
                }
                i += 1;
            }
        };
        if p.top_p < 1.0 {
            let threshold = (total as f64 * f64::from(p.top_p)).ceil() as u128;
            let last = walk(threshold.saturating_sub(1), &mut kept);
            kept.truncate(last + 1);
        }
        let kept_total: u128 = kept.iter().map(|c| u128::from(c.mass)).sum();
        let draw = uniform_u128(&mut self.rng, kept_total);
        let chosen = walk(draw, &mut kept);
        kept[chosen].id
    }
}

/// The non-NaN logits as candidates, with masses at `temperature` (none
/// computed, all zero, for `None`: greedy only needs the order). A token
/// masked out (`-inf`) is no candidate: it can be neither drawn nor listed
/// among the alternatives (JSON has no `-inf`).
fn candidates<'a>(
    logits: &'a [f32],
    tie_keys: &'a [u64],
    max: f32,
    temperature: Option<f32>,
) -> impl Iterator<Item = Candidate> + 'a {
    logits
        .iter()
        .zip(tie_keys)
        .enumerate()
        .filter(|(_, (logit, _))| !logit.is_nan() && **logit != f32::NEG_INFINITY)
        .map(move |(id, (&logit, &tie))| Candidate {
            logit,
            tie,
            id: id as u32,
            mass: temperature.map_or(0, |t| mass(logit, max, t)),
        })
}

/// Log-probabilities from candidates whose masses are at temperature 1.
fn token_logprobs(cands: &mut [Candidate], max: f32, token: u32, top: usize) -> TokenLogprobs {
    let unit = 2f64.powi(FRAC_BITS);
    let total: u128 = cands.iter().map(|c| u128::from(c.mass)).sum();
    let log_z = (total as f64 / unit).ln();
    let logprob = |logit: f32| (f64::from(logit - max) - log_z) as f32;
    let chosen = cands
        .iter()
        .find(|c| c.id == token)
        .map_or(f32::NEG_INFINITY, |c| logprob(c.logit));
    order_prefix(cands, top);
    TokenLogprobs {
        logprob: chosen,
        top: cands
            .iter()
            .take(top)
            .map(|c| (c.id, logprob(c.logit)))
            .collect(),
    }
}

/// Uniform in `0..bound` for a u128 bound that may exceed u64.
fn uniform_u128(rng: &mut ChaCha20Rng, bound: u128) -> u128 {
    if bound <= u128::from(u64::MAX) {
        return u128::from(uniform_below(rng, bound.max(1) as u64));
    }
    // Masses sum to at most vocab * 2^62 < 2^96: two words are plenty.
    let bits = 128 - (bound - 1).leading_zeros();
    loop {
        let hi = u128::from(rand_core::RngCore::next_u64(rng));
        let lo = u128::from(rand_core::RngCore::next_u64(rng));
        let x = ((hi << 64) | lo) >> (128 - bits);
        if x < bound {
            return x;
        }
    }
}

#[cfg(test)]
mod tests;
