//! Adversary 3: anyone who can query the blind server. It sends one-token
//! prompts of encrypted IDs and reads the top log-probabilities of the
//! answer. The *shape* of the next-token distribution after a token (how
//! sure the model is, how the mass falls off) does not depend on the
//! permutation, so comparing it with the public model's shapes, computed
//! locally for every plaintext token, identifies the queried token: this
//! works against any exact transform of a public model.
//!
//! The fingerprint of a token is the top `k` log-probabilities after it,
//! sorted (what an OpenAI `top_logprobs` answer gives), matched by
//! Euclidean distance. The answer also lists the IDs of those `k`
//! alternatives: once the queried token is known, they are the public
//! model's top `k` after it, rank for rank ([`Alternatives`]), so one query
//! can name many tokens. Two-token prompts of tokens already known reach
//! alternatives that follow no single token.

use candle_core::{DType, Device, Tensor, D};
use ee_engine::{CausalLm, SeqStep};

use crate::{Error, RecoveredMap};

/// The top-`k` log-probabilities of the next token after each of `tokens`
/// alone, sorted descending: `[tokens.len(), k]`, row-major.
///
/// # Errors
/// The model fails, or `k` exceeds its vocabulary.
pub fn fingerprints(model: &dyn CausalLm, tokens: &[u32], k: usize) -> Result<Vec<f32>, Error> {
    let prompts: Vec<Vec<u32>> = tokens.iter().map(|&t| vec![t]).collect();
    Ok(top_answers(model, &prompts, k)?
        .into_iter()
        .flat_map(|a| a.into_iter().map(|(_, logprob)| logprob))
        .collect())
}

/// An answer's top alternatives: (token ID, log-probability), most likely
/// first, as OpenAI's `top_logprobs` lists them.
pub type Answer = Vec<(u32, f32)>;

/// The top-`k` next tokens after each of `prompts`.
///
/// # Errors
/// The model fails, or `k` exceeds its vocabulary.
pub fn top_answers(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    k: usize,
) -> Result<Vec<Answer>, Error> {
    if k == 0 || k > model.vocab_size() {
        return Err(Error::Model(format!(
            "top-{k} answers need 1 to {} tokens",
            model.vocab_size()
        )));
    }
    const BATCH: usize = 64;
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(BATCH) {
        let mut caches: Vec<_> = chunk.iter().map(|_| model.new_cache()).collect();
        let mut steps: Vec<SeqStep<'_>> = chunk
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, cache)| SeqStep { tokens: p, cache })
            .collect();
        let logits = model.forward(&mut steps)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let (values, ids) = logp.sort_last_dim(false)?;
        let values = values.narrow(1, 0, k)?.to_vec2::<f32>()?;
        let ids = ids.narrow(1, 0, k)?.to_vec2::<u32>()?;
        out.extend(
            ids.into_iter()
                .zip(values)
                .map(|(i, v)| i.into_iter().zip(v).collect()),
        );
    }
    Ok(out)
}

/// Log-probabilities this close are the same number: bit-exact tiers give
/// equal ones, the Hugging Face hidden tier within about 1e-6.
const SAME: f32 = 1e-4;

/// Votes for what encrypted IDs are, from answers to prompts whose
/// plaintext the attacker knows: the answer's `j`-th alternative is the
/// public model's `j`-th after the same plaintext, wherever their
/// log-probabilities agree and neither neighbour ties with it (a tie could
/// list two tokens in either order).
#[derive(Debug, Default)]
pub struct Alternatives {
    votes: std::collections::HashMap<u32, std::collections::HashMap<u32, u32>>,
}

impl Alternatives {
    /// Counts the alternatives of one `answer` (encrypted) against the
    /// `public` answer to its plaintext prompt. The last listed rank is
    /// left out: it may tie with the first unlisted one.
    pub fn add(&mut self, answer: &[(u32, f32)], public: &[(u32, f32)]) {
        let tied = |a: &[(u32, f32)], j: usize| {
            let near = |i: usize| a.get(i).is_some_and(|x| (x.1 - a[j].1).abs() <= SAME);
            (j > 0 && near(j - 1)) || near(j + 1)
        };
        let listed = answer.len().min(public.len()).saturating_sub(1);
        for (j, (&(c, v), &(p, w))) in answer.iter().zip(public).take(listed).enumerate() {
            if (v - w).abs() <= SAME && !tied(answer, j) && !tied(public, j) {
                *self.votes.entry(c).or_default().entry(p).or_insert(0) += 1;
            }
        }
    }

    /// `map` with every ID it lacks filled by its most voted plaintext
    /// (ties by the lower ID), unless another ID already holds that one.
    pub fn fill(&self, map: &mut RecoveredMap) {
        let mut held: std::collections::HashSet<u32> = map.0.iter().flatten().copied().collect();
        let mut ids: Vec<&u32> = self.votes.keys().collect();
        ids.sort_unstable();
        for c in ids {
            let best = self.votes[c]
                .iter()
                .max_by_key(|&(&p, &n)| (n, std::cmp::Reverse(p)))
                .map(|(&p, _)| p);
            if let (Some(slot @ None), Some(p)) = (map.0.get_mut(*c as usize), best) {
                if held.insert(p) {
                    *slot = Some(p);
                }
            }
        }
    }
}

/// `count` pairs of `ids` drawn at random (seeded), for two-token prompts;
/// none when there are no IDs.
pub fn random_pairs(ids: &[u32], count: usize, seed: u64) -> Vec<[u32; 2]> {
    use rand_core::SeedableRng;
    if ids.is_empty() {
        return Vec::new();
    }
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let mut pick = || ids[ee_core::rng::uniform_below(&mut rng, ids.len() as u64) as usize];
    (0..count).map(|_| [pick(), pick()]).collect()
}

/// Maps each queried encrypted ID to the plaintext token whose public
/// fingerprint is nearest. `queried` are (encrypted ID, fingerprint) rows
/// of width `k`; `public` holds a row per plaintext ID.
///
/// # Errors
/// Widths that disagree.
pub fn match_fingerprints(
    queried_ids: &[u32],
    queried: &[f32],
    public: &[f32],
    k: usize,
    vocab: usize,
) -> Result<RecoveredMap, Error> {
    if queried.len() != queried_ids.len() * k || !public.len().is_multiple_of(k) {
        return Err(Error::Model("fingerprint widths disagree".into()));
    }
    let q = Tensor::from_slice(queried, (queried_ids.len(), k), &Device::Cpu)?;
    let p = Tensor::from_slice(public, (public.len() / k, k), &Device::Cpu)?;
    // |q − p|² = |q|² + |p|² − 2 q·p; the |q|² term does not change the argmin.
    let p_sq = p.sqr()?.sum(1)?.unsqueeze(0)?;
    let mut map = RecoveredMap::empty(vocab);
    const BLOCK: usize = 1024;
    for start in (0..queried_ids.len()).step_by(BLOCK) {
        let len = BLOCK.min(queried_ids.len() - start);
        let dots = q.narrow(0, start, len)?.matmul(&p.t()?)?;
        let dist = p_sq.broadcast_sub(&(dots * 2.0)?)?;
        let best = dist
            .argmin(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        for (c, t) in queried_ids[start..start + len].iter().zip(best) {
            if let Some(slot) = map.0.get_mut(*c as usize) {
                *slot = Some(t);
            }
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Score;
    use ee_engine::testing::{write_tiny_model, TinySpec};

    /// On a tiny model, querying the artifact with every encrypted ID
    /// recovers nearly every token from the shapes alone.
    #[test]
    fn shapes_of_next_token_distributions_identify_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_model(&model, &TinySpec::llama_q4_1()).unwrap();
        let public = ee_engine::load(&model).unwrap();
        let n = public.vocab_size();
        let key = ee_core::Key::from_bytes([4; 32]).vocab_permutation(n as u32);
        let artifact = dir.path().join("server.gguf");
        ee_core::transform::write_server_artifact(&model, &artifact, &key, &mut |_, _| {}).unwrap();
        let server = ee_engine::load(&artifact).unwrap();
        let k = 20;
        let all: Vec<u32> = (0..n as u32).collect();
        let public_fp = fingerprints(public.as_ref(), &all, k).unwrap();
        let server_fp = fingerprints(server.as_ref(), &all, k).unwrap();
        let map = match_fingerprints(&all, &server_fp, &public_fp, k, n).unwrap();
        let s = Score::of(&map, &key, &[]);
        // Exact arithmetic: the encrypted model's shapes are the public
        // model's, so every token with a distinct shape is found.
        assert!(s.vocab_recovered() > 0.95, "{s:?}");
        assert!(fingerprints(public.as_ref(), &all, 0).is_err());

        // A few queries, and the alternatives their answers list: each
        // answer names up to k more tokens, where the public model's
        // answer to the matched plaintext lists them at the same ranks.
        let queried = &all[..8];
        let prompts: Vec<Vec<u32>> = queried.iter().map(|&c| vec![c]).collect();
        let answers = top_answers(server.as_ref(), &prompts, k).unwrap();
        let few = match_fingerprints(queried, &server_fp[..8 * k], &public_fp, k, n).unwrap();
        let mut alternatives = Alternatives::default();
        for (c, answer) in queried.iter().zip(&answers) {
            let Some(t) = few.0[*c as usize] else {
                continue;
            };
            let public_answer = &top_answers(public.as_ref(), &[vec![t]], k).unwrap()[0];
            alternatives.add(answer, public_answer);
        }
        let mut more = few.clone();
        alternatives.fill(&mut more);
        let (a, b) = (Score::of(&few, &key, &[]), Score::of(&more, &key, &[]));
        assert!(b.vocab_correct > 2 * a.vocab_correct, "{a:?} {b:?}");
        assert!(b.vocab_wrong <= a.vocab_wrong + 1, "{a:?} {b:?}");
    }
}
