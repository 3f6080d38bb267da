//! What a model is, to the scheduler, [`generate`](crate::generate()) and the
//! server: a causal language model that advances sequences, each with its
//! own KV cache, and returns logits. Architectures implement [`CausalLm`]
//! (one file each under `models/`); [`crate::loader`] builds one from a
//! weight source and a config.

use candle_core::Tensor;

use crate::kv_cache::KvCache;
use crate::Error;

/// One sequence's share of a forward step.
pub struct SeqStep<'a> {
    /// Tokens to append (a prefill chunk, or one decode token). Not empty.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// A decoder-only language model over token IDs, plaintext or EE-transformed
/// alike: an encrypted artifact is run exactly like a plaintext one.
pub trait CausalLm: Send + Sync {
    /// The architecture, as the model's config names it (`llama`, `mistral`).
    fn architecture(&self) -> &str;

    /// Rows of the embedding: token IDs are `0..vocab_size`.
    fn vocab_size(&self) -> usize;

    /// The most positions a sequence may hold, prompt and answer together.
    fn context_length(&self) -> usize;

    /// The formats of the weight matrices, each once, in the order the
    /// forward pass meets them (`Q4_1, Q8_0`; `BF16`).
    fn weight_types(&self) -> String;

    /// A fresh, empty cache for a new sequence.
    fn new_cache(&self) -> KvCache;

    /// A key per token ID that the vocabulary permutation carries along with
    /// the token (a hash of the token's output-head row, which moves with
    /// it). Samplers break exact logit ties with it, so tie-breaking gives
    /// the same plaintext token on the encrypted and the plaintext model.
    fn tie_keys(&self) -> &[u64];

    /// Advances every sequence in `batch` by its tokens and returns the
    /// logits after each sequence's last token: `[batch.len(), vocab]`.
    /// A sequence's logits do not depend on what else is in the batch.
    ///
    /// Errors: an empty step, a token outside the vocabulary, or a step past
    /// the context length; no cache is advanced then.
    fn forward(&self, batch: &mut [SeqStep<'_>]) -> Result<Tensor, Error>;

    /// Like [`forward`](Self::forward) for one sequence, but returns the
    /// logits at every new position: `[tokens.len(), vocab]`.
    fn forward_all_positions(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, Error>;

    /// [`forward`](Self::forward) for one sequence: the logits after its
    /// last token, `[vocab]`.
    fn forward_one(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, Error> {
        let logits = self.forward(&mut [SeqStep { tokens, cache }])?;
        Ok(logits.squeeze(0)?.to_vec1()?)
    }
}

/// Checks a step against what every model constrains: a step has tokens,
/// each inside the vocabulary, and fits the context. Returns all the steps'
/// tokens stacked, and the row of each sequence's last token.
pub(crate) fn stack_steps(
    batch: &[SeqStep<'_>],
    vocab_size: usize,
    context_length: usize,
) -> Result<(Vec<u32>, Vec<u32>), Error> {
    let mut ids = Vec::new();
    let mut last_rows = Vec::with_capacity(batch.len());
    for step in batch {
        if step.tokens.is_empty() {
            return Err(Error::Model("a sequence step has no tokens".into()));
        }
        let needed = step.cache.len() + step.tokens.len();
        if needed > context_length {
            return Err(Error::ContextOverflow {
                needed,
                limit: context_length,
            });
        }
        if let Some(&bad) = step.tokens.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(Error::TokenOutOfRange {
                token: bad,
                vocab_size,
            });
        }
        ids.extend_from_slice(step.tokens);
        last_rows.push(ids.len() as u32 - 1);
    }
    Ok((ids, last_rows))
}

/// The pool every forward pass runs in. The calling thread joins it for the
/// whole pass, so its serial work (attention, norms) does not compete for
/// the cores with idle workers spinning between parallel matmuls.
pub(crate) fn compute_pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("ee-compute-{i}"))
            .build()
            .expect("building the compute thread pool")
    })
}
