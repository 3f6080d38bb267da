//! The scorer: the only code in the lab that reads the true key. It grades a
//! [`RecoveredMap`] over the vocabulary, over the tokens of some traffic, and
//! by the published EE contest's rule (+10 per correct mapping, −1 per wrong
//! one, over the distinct tokens of the traffic).

use std::collections::HashSet;

use ee_core::Permutation;
use serde::Serialize;

use crate::RecoveredMap;

/// How much of a key an attack recovered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// Vocabulary entries mapped right / wrong / in all.
    pub vocab_correct: usize,
    pub vocab_wrong: usize,
    pub vocab_total: usize,
    /// Over the traffic's distinct tokens: right, wrong, in all.
    pub traffic_distinct_correct: usize,
    pub traffic_distinct_wrong: usize,
    pub traffic_distinct_total: usize,
    /// Fraction of the traffic's token occurrences decrypted right.
    pub traffic_token_accuracy: f64,
    /// The contest's score over the traffic's distinct tokens.
    pub contest_score: i64,
}

impl Score {
    /// Grades `map` against the true vocabulary permutation `key`; `traffic`
    /// is the encrypted IDs the adversary saw (empty for weight attacks:
    /// then the traffic figures are over nothing).
    pub fn of(map: &RecoveredMap, key: &Permutation, traffic: &[u32]) -> Self {
        let right = |c: u32| -> Option<bool> {
            let guess = (*map.0.get(c as usize)?)?;
            Some(key.decrypt(c) == Some(guess))
        };
        let (mut vocab_correct, mut vocab_wrong) = (0, 0);
        for c in 0..key.len() as u32 {
            match right(c) {
                Some(true) => vocab_correct += 1,
                Some(false) => vocab_wrong += 1,
                None => {}
            }
        }
        let distinct: HashSet<u32> = traffic.iter().copied().collect();
        let distinct_right = distinct.iter().filter(|&&c| right(c) == Some(true)).count();
        let distinct_wrong = distinct
            .iter()
            .filter(|&&c| right(c) == Some(false))
            .count();
        let occurrences_right = traffic.iter().filter(|&&c| right(c) == Some(true)).count();
        Self {
            vocab_correct,
            vocab_wrong,
            vocab_total: key.len(),
            traffic_distinct_correct: distinct_right,
            traffic_distinct_wrong: distinct_wrong,
            traffic_distinct_total: distinct.len(),
            traffic_token_accuracy: if traffic.is_empty() {
                0.0
            } else {
                occurrences_right as f64 / traffic.len() as f64
            },
            contest_score: 10 * distinct_right as i64 - distinct_wrong as i64,
        }
    }

    /// Fraction of the vocabulary recovered.
    pub fn vocab_recovered(&self) -> f64 {
        self.vocab_correct as f64 / self.vocab_total.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_vocabulary_traffic_and_the_contest_rule() {
        // π: 0→2, 1→0, 2→1, 3→3 (forward: plaintext → encrypted).
        let key = Permutation::from_forward(vec![2, 0, 1, 3]).unwrap();
        // Encrypted 2 is plaintext 0 (right), encrypted 0 is 1 (right),
        // encrypted 1 is 2 (guessed 3: wrong), encrypted 3 unknown.
        let map = RecoveredMap(vec![Some(1), Some(3), Some(0), None]);
        let s = Score::of(&map, &key, &[2, 2, 0, 1, 3]);
        assert_eq!((s.vocab_correct, s.vocab_wrong, s.vocab_total), (2, 1, 4));
        assert_eq!(
            (
                s.traffic_distinct_correct,
                s.traffic_distinct_wrong,
                s.traffic_distinct_total
            ),
            (2, 1, 4)
        );
        assert!((s.traffic_token_accuracy - 0.6).abs() < 1e-12);
        assert_eq!(s.contest_score, 19);
        assert!((s.vocab_recovered() - 0.5).abs() < 1e-12);
    }
}
