//! What an encoder model is, to the server and tests: a bidirectional
//! model (BERT, DistilBERT) that turns a batch of token sequences into
//! pooled embeddings or classification logits. Architectures implement
//! [`Encoder`] (one file each under `models/`).
//!
//! A batch is packed, not padded: the sequences' tokens are stacked into
//! one `[total_tokens, hidden]` matrix for every matmul, and attention runs
//! per sequence over its own keys only (as varlen attention does in vLLM).
//! There is no padding to mask, and a sequence's result does not depend on
//! what else is in the batch.

use candle_core::{Tensor, D};

use crate::Error;

/// How the token states of a sequence become one embedding
/// (sentence-transformers' `Pooling` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token's state (`[CLS]`).
    Cls,
    /// The mean over the sequence's tokens.
    Mean,
    /// The per-channel maximum over its tokens.
    Max,
}

/// Pooling, then L2 normalisation if the model's modules end with
/// sentence-transformers' `Normalize`.
///
/// Every step acts per channel or is invariant under a channel permutation
/// (the L2 norm), so pooling commutes with the hidden-channel permutation σ
/// of an encrypted encoder: the server pools σ-permuted states into a
/// σ-permuted embedding without ever holding it in the user's coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    pub mode: PoolingMode,
    pub normalize: bool,
}

impl Default for Pooling {
    /// What sentence-transformers builds for a model without `modules.json`.
    fn default() -> Self {
        Self {
            mode: PoolingMode::Mean,
            normalize: false,
        }
    }
}

impl Pooling {
    /// Pools `states` (`[len, hidden]`, one sequence) into `[hidden]`.
    pub fn pool(&self, states: &Tensor) -> Result<Vec<f32>, Error> {
        let pooled = match self.mode {
            PoolingMode::Cls => states.get(0)?,
            PoolingMode::Mean => states.mean(0)?,
            PoolingMode::Max => states.max(0)?,
        };
        let mut v: Vec<f32> = pooled.to_vec1()?;
        if self.normalize {
            // torch.nn.functional.normalize: x / max(‖x‖₂, 1e-12).
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        Ok(v)
    }
}

/// A BERT-family encoder over token IDs, plaintext or EE-transformed alike.
pub trait Encoder: Send + Sync {
    /// `bert` or `distilbert`.
    fn architecture(&self) -> &str;

    /// Rows of the token embedding: token IDs are `0..vocab_size`.
    fn vocab_size(&self) -> usize;

    /// The longest sequence, special tokens included (position embeddings).
    fn max_positions(&self) -> usize;

    /// Width of the embeddings.
    fn hidden_size(&self) -> usize;

    /// Classes of the classification head; `None` for a bare encoder.
    fn num_labels(&self) -> Option<usize>;

    /// How [`embed`](Self::embed) pools.
    fn pooling(&self) -> Pooling;

    /// The last layer's token states of every sequence, packed in order:
    /// `[Σ len, hidden]`.
    ///
    /// Errors: an empty batch or sequence, a token outside the vocabulary,
    /// or a sequence longer than [`max_positions`](Self::max_positions).
    fn hidden_states(&self, batch: &[&[u32]]) -> Result<Tensor, Error>;

    /// Classification logits from the packed last states of `batch`
    /// ([`hidden_states`](Self::hidden_states)): `[batch.len(), labels]`.
    /// Errors for a bare encoder.
    fn classifier_logits(&self, states: &Tensor, lens: &[usize]) -> Result<Tensor, Error>;

    /// One pooled embedding (`[hidden]`) per sequence.
    fn embed(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, Error> {
        let states = self.hidden_states(batch)?;
        let pooling = self.pooling();
        sequences(&states, batch)?
            .iter()
            .map(|s| pooling.pool(s))
            .collect()
    }

    /// Class probabilities (softmax of the logits, `[labels]`) per sequence.
    fn classify(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>, Error> {
        let states = self.hidden_states(batch)?;
        let lens: Vec<usize> = batch.iter().map(|s| s.len()).collect();
        let logits = self.classifier_logits(&states, &lens)?;
        Ok(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()?)
    }
}

/// Each sequence's rows of packed states.
pub(crate) fn sequences(states: &Tensor, batch: &[&[u32]]) -> Result<Vec<Tensor>, Error> {
    let mut start = 0;
    batch
        .iter()
        .map(|s| {
            let rows = states.narrow(0, start, s.len())?;
            start += s.len();
            Ok(rows)
        })
        .collect()
}

/// Checks a batch against what every encoder constrains; returns its
/// tokens stacked and each token's position within its sequence.
pub(crate) fn stack_batch(
    batch: &[&[u32]],
    vocab_size: usize,
    max_positions: usize,
) -> Result<(Vec<u32>, Vec<u32>), Error> {
    if batch.is_empty() {
        return Err(Error::Model("an encoder batch has no sequences".into()));
    }
    let (mut ids, mut positions) = (Vec::new(), Vec::new());
    for seq in batch {
        if seq.is_empty() {
            return Err(Error::Model("an encoder sequence has no tokens".into()));
        }
        if seq.len() > max_positions {
            return Err(Error::ContextOverflow {
                needed: seq.len(),
                limit: max_positions,
            });
        }
        if let Some(&bad) = seq.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::TokenOutOfRange {
                token: bad,
                vocab_size,
            });
        }
        ids.extend_from_slice(seq);
        positions.extend(0..seq.len() as u32);
    }
    Ok((ids, positions))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pooling_modes_and_normalisation() {
        let states = Tensor::new(&[[3f32, 0.0], [1.0, 4.0]], &Device::Cpu).unwrap();
        let pool = |mode, normalize| Pooling { mode, normalize }.pool(&states).unwrap();
        assert_eq!(pool(PoolingMode::Cls, false), [3.0, 0.0]);
        assert_eq!(pool(PoolingMode::Mean, false), [2.0, 2.0]);
        assert_eq!(pool(PoolingMode::Max, false), [3.0, 4.0]);
        assert_eq!(pool(PoolingMode::Cls, true), [1.0, 0.0]);
        let zero = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let v = Pooling {
            mode: PoolingMode::Mean,
            normalize: true,
        }
        .pool(&zero)
        .unwrap();
        assert_eq!(v, [0.0, 0.0]);
    }

    #[test]
    fn a_bad_batch_is_refused_with_its_reason() {
        let long = [1u32; 9];
        for (batch, named) in [
            (vec![], "no sequences"),
            (vec![&[][..]], "no tokens"),
            (vec![&long[..]], "limit is 8"),
            (vec![&[1, 50][..]], "50"),
        ] {
            let err = stack_batch(&batch, 10, 8).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        let (ids, pos) = stack_batch(&[&[4, 5, 6], &[7]], 10, 8).unwrap();
        assert_eq!((ids, pos), (vec![4, 5, 6, 7], vec![0, 1, 2, 0]));
    }
}
