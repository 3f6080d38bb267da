//! Adversary 1: the server operator, holding the artifact and the public
//! base model it was made from. The vocabulary permutation moves rows whole,
//! so each artifact row *is* a base row: matching them recovers the key.
//!
//! - [`exact`]: rows compared byte for byte (embedding, and output head when
//!   untied), which breaks a vocabulary-only key.
//! - [`sorted`]: rows compared as their sorted values, which a permutation
//!   of hidden channels does not change ("Hidden No More", ICML 2025, uses
//!   the same invariance), so it also breaks a hidden-channel key.
//!
//! A signature shared by several base rows (tokens whose rows are equal, as
//! untrained ones often are) is left unmapped rather than guessed.

use std::collections::HashMap;

use crate::rows::{RowMatrix, VocabRows};
use crate::{Error, RecoveredMap};

/// Matches rows by their stored bytes.
///
/// # Errors
/// The two models store their rows differently (another format or type),
/// so bytes cannot compare.
pub fn exact(base: &VocabRows, artifact: &VocabRows) -> Result<RecoveredMap, Error> {
    let widths = |r: &VocabRows| (r.embedding.row_bytes, r.head.as_ref().map(|h| h.row_bytes));
    if widths(base) != widths(artifact) {
        return Err(Error::Model(format!(
            "the base stores rows of {:?} bytes and the artifact of {:?}: compare sorted values instead",
            widths(base),
            widths(artifact)
        )));
    }
    Ok(match_signatures(base, artifact, |m, i| {
        m.row_stored(i).to_vec()
    }))
}

/// Matches rows by their sorted values.
pub fn sorted(base: &VocabRows, artifact: &VocabRows) -> RecoveredMap {
    match_signatures(base, artifact, |m, i| {
        let mut v = m.row(i).to_vec();
        v.sort_by(f32::total_cmp);
        v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()
    })
}

fn match_signatures(
    base: &VocabRows,
    artifact: &VocabRows,
    signature: impl Fn(&RowMatrix, usize) -> Vec<u8>,
) -> RecoveredMap {
    let of = |rows: &VocabRows, i: usize| {
        let mut s = signature(&rows.embedding, i);
        if let Some(head) = &rows.head {
            s.extend(signature(head, i));
        }
        s
    };
    let mut by_signature: HashMap<Vec<u8>, Option<u32>> = HashMap::new();
    for t in 0..base.vocab_size() {
        by_signature
            .entry(of(base, t))
            // A second base row with this signature makes it ambiguous.
            .and_modify(|id| *id = None)
            .or_insert(Some(t as u32));
    }
    RecoveredMap(
        (0..artifact.vocab_size())
            .map(|c| by_signature.get(&of(artifact, c)).copied().flatten())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Score;
    use ee_core::Permutation;

    /// A base model's rows, and the artifact a key makes of them.
    fn pair(n: usize, dim: usize) -> (VocabRows, VocabRows, Permutation) {
        let values: Vec<f32> = (0..n * dim)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0)
            .collect();
        let base = VocabRows {
            embedding: RowMatrix::from_values(values, dim),
            head: None,
        };
        let key = ee_core::Key::from_bytes([7; 32]).vocab_permutation(n as u32);
        let mut moved = vec![0f32; n * dim];
        for t in 0..n {
            let c = key.encrypt(t as u32).unwrap() as usize;
            moved[c * dim..(c + 1) * dim].copy_from_slice(base.embedding.row(t));
        }
        let artifact = VocabRows {
            embedding: RowMatrix::from_values(moved, dim),
            head: None,
        };
        (base, artifact, key)
    }

    #[test]
    fn exact_matching_recovers_a_vocabulary_key_whole() {
        let (base, artifact, key) = pair(200, 16);
        let s = Score::of(&exact(&base, &artifact).unwrap(), &key, &[]);
        assert_eq!((s.vocab_correct, s.vocab_wrong), (200, 0));
    }

    #[test]
    fn sorted_matching_survives_a_channel_permutation_where_exact_fails() {
        let (base, artifact, key) = pair(200, 16);
        // Permute every row's channels the same way (a hidden-channel key).
        let sigma: Vec<usize> = (0..16).map(|i| (i * 5 + 3) % 16).collect();
        let shuffled: Vec<f32> = (0..200)
            .flat_map(|r| sigma.iter().map(move |&j| (r, j)))
            .map(|(r, j)| artifact.embedding.row(r)[j])
            .collect();
        let hidden = VocabRows {
            embedding: RowMatrix::from_values(shuffled, 16),
            head: None,
        };
        assert_eq!(
            Score::of(&exact(&base, &hidden).unwrap(), &key, &[]).vocab_correct,
            0
        );
        assert_eq!(
            Score::of(&sorted(&base, &hidden), &key, &[]).vocab_correct,
            200
        );
    }

    /// The whole path on real files: tiny GGUF and checkpoint models (tied
    /// and untied heads), their server artifacts as `ee encrypt-model`
    /// writes them, read back as an operator reads them.
    #[test]
    fn a_tiny_models_artifact_gives_up_its_whole_key() {
        use ee_engine::testing::{hf, write_tiny_model, TinySpec};
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        let untied = TinySpec {
            untied_output: true,
            ..TinySpec::llama_q4_1()
        };
        write_tiny_model(&gguf, &untied).unwrap();
        let checkpoint = dir.path().join("tiny-hf");
        let spec = hf::TinyHfSpec::llama(safetensors::tensor::Dtype::BF16);
        std::fs::create_dir(&checkpoint).unwrap();
        hf::write_tiny_hf_model(&checkpoint, &spec).unwrap();
        for (model, artifact) in [
            (gguf, dir.path().join("server.gguf")),
            (checkpoint, dir.path().join("server-hf")),
        ] {
            let base = VocabRows::read(&model).unwrap();
            let n = base.vocab_size() as u32;
            let key = ee_core::Key::from_bytes([3; 32]).vocab_permutation(n);
            ee_core::transform::write_server_artifact(&model, &artifact, &key, &mut |_, _| {})
                .unwrap();
            let seen = VocabRows::read(&artifact).unwrap();
            for map in [exact(&base, &seen).unwrap(), sorted(&base, &seen)] {
                let s = Score::of(&map, &key, &[]);
                assert_eq!(
                    (s.vocab_correct, s.vocab_wrong),
                    (n as usize, 0),
                    "{}",
                    model.display()
                );
            }
        }
    }

    #[test]
    fn equal_base_rows_are_left_unmapped() {
        let base = VocabRows {
            embedding: RowMatrix::from_values(vec![1.0, 1.0, 1.0, 1.0, 2.0, 3.0], 2),
            head: None,
        };
        let map = exact(&base, &base).unwrap();
        assert_eq!(map.0, vec![None, None, Some(2)]);
        // Rows stored another way cannot be compared byte for byte.
        let mut wider = base.clone();
        wider.embedding.row_bytes *= 2;
        assert!(exact(&base, &wider).is_err());
    }
}
