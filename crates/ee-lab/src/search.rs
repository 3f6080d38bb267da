//! Adversary 4's other searches, the two the published write-up names
//! beside hill climbing: random sampling and a genetic search. Both start
//! from the frequency match ([`crate::frequency::frequency_match`]) and
//! spend a fixed budget of full evaluations of the linguistic loss (the
//! traffic's log-likelihood under the prior's bigram model); the best key
//! found wins. Keys drawn uniformly from all V! would never beat the
//! frequency match, so both search near it: a candidate is the start with
//! a few transpositions among encrypted IDs of similar frequency rank, where
//! a frequency match's mistakes are.
//!
//! - [`random_sampling`]: independent candidates, the best kept.
//! - [`genetic`]: a population bred by tournament selection, uniform
//!   crossover (a child takes each ID's guess from either parent, repaired
//!   so that no two IDs share a guess) and the same transpositions as
//!   mutation, with the best few kept unchanged each generation.

use std::collections::HashMap;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::frequency::{ranked_cipher, BigramModel, CipherBigrams};
use crate::RecoveredMap;

/// The compute a search may spend.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Full evaluations of the traffic's log-likelihood.
    pub evaluations: usize,
    /// Seeds the candidates.
    pub seed: u64,
}

/// Individuals per generation of [`genetic`].
const POPULATION: usize = 32;
/// The best individuals kept unchanged into the next generation.
const ELITE: usize = 4;
/// Individuals drawn per tournament; the fittest is a parent.
const TOURNAMENT: usize = 3;

/// A key guess and its log-likelihood.
type Individual = (f64, Vec<Option<u32>>);

/// The IDs a search may move, and its randomness.
struct Space {
    cipher: Vec<u32>,
    window: usize,
    rng: ChaCha20Rng,
}

impl Space {
    fn new(traffic: &[Vec<u32>], known: &[(u32, u32)], len: usize, seed: u64) -> Self {
        let cipher: Vec<u32> = ranked_cipher(traffic)
            .into_iter()
            .filter(|&c| (c as usize) < len && !known.iter().any(|k| k.0 == c))
            .collect();
        let window = (cipher.len() / 10).clamp(20, 200);
        Self {
            cipher,
            window,
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    fn below(&mut self, n: usize) -> usize {
        ee_core::rng::uniform_below(&mut self.rng, n.max(1) as u64) as usize
    }

    /// `swaps` transpositions of two IDs' guesses within the rank window.
    fn mutate(&mut self, guess: &mut [Option<u32>], swaps: usize) {
        for _ in 0..swaps {
            let i = self.below(self.cipher.len());
            let lo = i.saturating_sub(self.window);
            let hi = (i + self.window + 1).min(self.cipher.len());
            let j = lo + self.below(hi - lo);
            guess.swap(self.cipher[i] as usize, self.cipher[j] as usize);
        }
    }

    /// A candidate: `start` with 1 to `max(1, IDs / 50)` (at most 20)
    /// transpositions.
    fn mutant(&mut self, start: &[Option<u32>]) -> Vec<Option<u32>> {
        let mut candidate = start.to_vec();
        let swaps = 1 + self.below((self.cipher.len() / 50).clamp(1, 20));
        self.mutate(&mut candidate, swaps);
        candidate
    }
}

/// Random sampling: `budget.evaluations` candidates, each the start with
/// a few random transpositions; the most likely one (the start included)
/// is returned. `known` encrypted IDs never move.
pub fn random_sampling(
    traffic: &[Vec<u32>],
    prior: &BigramModel,
    start: RecoveredMap,
    known: &[(u32, u32)],
    budget: Budget,
) -> RecoveredMap {
    let mut space = Space::new(traffic, known, start.0.len(), budget.seed);
    if space.cipher.len() < 2 {
        return start;
    }
    let bigrams = CipherBigrams::of(traffic);
    let mut best_score = bigrams.total(&start.0, prior);
    let mut best = start.0.clone();
    for _ in 1..budget.evaluations {
        let candidate = space.mutant(&start.0);
        let score = bigrams.total(&candidate, prior);
        if score > best_score {
            (best, best_score) = (candidate, score);
        }
    }
    RecoveredMap(best)
}

/// A genetic search of `budget.evaluations` evaluations in generations of
/// [`POPULATION`], seeded with the start and its mutants; returns the most
/// likely individual seen. `known` encrypted IDs never move.
pub fn genetic(
    traffic: &[Vec<u32>],
    prior: &BigramModel,
    start: RecoveredMap,
    known: &[(u32, u32)],
    budget: Budget,
) -> RecoveredMap {
    let mut space = Space::new(traffic, known, start.0.len(), budget.seed);
    if space.cipher.len() < 2 || budget.evaluations < 2 {
        return start;
    }
    let bigrams = CipherBigrams::of(traffic);
    let score = |guess: &[Option<u32>]| bigrams.total(guess, prior);
    let mut population: Vec<Individual> = vec![(score(&start.0), start.0.clone())];
    while population.len() < POPULATION.min(budget.evaluations) {
        let mutant = space.mutant(&start.0);
        population.push((score(&mutant), mutant));
    }
    let by_fitness = |p: &mut Vec<Individual>| {
        p.sort_by(|a, b| b.0.total_cmp(&a.0));
    };
    by_fitness(&mut population);
    let mut spent = population.len();
    while spent < budget.evaluations {
        let mut next: Vec<Individual> = population[..ELITE.min(population.len())].to_vec();
        while next.len() < POPULATION && spent < budget.evaluations {
            let a = tournament(&population, &mut space);
            let b = tournament(&population, &mut space);
            let mut child = crossover(&population[a].1, &population[b].1, &mut space);
            let swaps = space.below(3);
            space.mutate(&mut child, swaps);
            next.push((score(&child), child));
            spent += 1;
        }
        by_fitness(&mut next);
        population = next;
    }
    RecoveredMap(population.swap_remove(0).1)
}

/// The index of the fittest of [`TOURNAMENT`] random individuals of a
/// population sorted fittest first.
fn tournament(population: &[Individual], space: &mut Space) -> usize {
    (0..TOURNAMENT)
        .map(|_| space.below(population.len()))
        .min()
        .unwrap_or(0)
}

/// Uniform crossover: `a` with each movable ID's guess taken from `b` half
/// the time. Taking `b`'s guess swaps it with the ID of the child that held
/// it, so no two IDs share a guess.
fn crossover(a: &[Option<u32>], b: &[Option<u32>], space: &mut Space) -> Vec<Option<u32>> {
    let mut child = a.to_vec();
    let mut holder: HashMap<u32, u32> = space
        .cipher
        .iter()
        .filter_map(|&c| child[c as usize].map(|p| (p, c)))
        .collect();
    for i in 0..space.cipher.len() {
        let c = space.cipher[i];
        let Some(want) = b[c as usize] else { continue };
        if space.below(2) == 0 || child[c as usize] == Some(want) {
            continue;
        }
        let old = child[c as usize];
        match holder.get(&want).copied() {
            Some(d) => {
                child.swap(c as usize, d as usize);
                if let Some(o) = old {
                    holder.insert(o, d);
                }
            }
            None => {
                child[c as usize] = Some(want);
                if let Some(o) = old {
                    holder.remove(&o);
                }
            }
        }
        holder.insert(want, c);
    }
    child
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frequency::frequency_match;
    use crate::frequency::tests::corpus;
    use crate::Score;

    #[test]
    fn both_searches_never_lose_likelihood_and_keep_guesses_distinct() {
        let vocab = 64;
        let key = ee_core::Key::from_bytes([6; 32]).vocab_permutation(vocab as u32);
        let plain = corpus(1, 2000);
        let traffic: Vec<Vec<u32>> = plain.iter().map(|s| key.encrypt_all(s).unwrap()).collect();
        let prior = BigramModel::train(&corpus(2, 2000), vocab);
        let flat: Vec<u32> = traffic.concat();
        let known = [(key.encrypt(1).unwrap(), 1)];
        let start = frequency_match(&traffic, &prior, &known, vocab);
        let bigrams = CipherBigrams::of(&traffic);
        let base = bigrams.total(&start.0, &prior);
        let budget = Budget {
            evaluations: 400,
            seed: 3,
        };
        for (name, found) in [
            (
                "random",
                random_sampling(&traffic, &prior, start.clone(), &known, budget),
            ),
            (
                "genetic",
                genetic(&traffic, &prior, start.clone(), &known, budget),
            ),
        ] {
            assert!(bigrams.total(&found.0, &prior) >= base, "{name}");
            let guesses: Vec<u32> = found.0.iter().flatten().copied().collect();
            let mut distinct = guesses.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), guesses.len(), "{name}: a guess held twice");
            assert_eq!(found.0[known[0].0 as usize], Some(1), "{name}: known moved");
            let (s, s0) = (
                Score::of(&found, &key, &flat),
                Score::of(&start, &key, &flat),
            );
            eprintln!("{name}: {s:?} from {s0:?}");
        }
        // The genetic search, with crossover, improves on the start here.
        let bred = genetic(&traffic, &prior, start.clone(), &known, budget);
        assert!(bigrams.total(&bred.0, &prior) > base);
    }

    #[test]
    fn crossover_takes_guesses_from_both_parents_without_repeats() {
        let traffic = vec![(0..10u32).collect::<Vec<_>>()];
        let mut space = Space::new(&traffic, &[], 10, 9);
        let a: Vec<Option<u32>> = (0..10).map(Some).collect();
        let b: Vec<Option<u32>> = (0..10).rev().map(Some).collect();
        let child = crossover(&a, &b, &mut space);
        let mut seen: Vec<u32> = child.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_ne!(child, a);
    }
}
