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

    /// Bytes of KV cache one position of a sequence takes, over all layers.
    fn kv_bytes_per_token(&self) -> usize;

    /// What tokens cost in a forward step, for the scheduler's budget.
    fn step_cost(&self) -> StepCost;

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

/// What a forward step costs, in units of one token's pass through the
/// layers' weight matrices (the cost of a prompt token at the start of a
/// context).
///
/// A token at depth `d` costs `1 + min(d, window) / attention_depth`: its
/// weight matmuls, plus attention over the positions before it. Measured
/// on SmolLM2-135M Q4_1 (2 AVX-512 cores), a prefilled token took 0.46 ms
/// plus 0.45 µs per position attended to (`attention_depth` ≈ 1,000), and
/// a decode step 2.9 ms plus 1.9 µs per position (≈ 1,500).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    /// Positions attended to that cost as much as the weight matmuls.
    pub attention_depth: f64,
    /// Sliding-window attention: no token attends to more positions.
    pub window: Option<usize>,
}

impl StepCost {
    /// Our attention takes about as long per multiply-add as three of the
    /// quantized matmuls' (measured as in the type's docs: 3,072 positions
    /// by multiply-adds, 1,000 to 1,500 by time).
    const ATTENTION_SLOWDOWN: f64 = 3.0;

    /// The cost of a Llama-family model, from its multiply-adds per token
    /// and per attended position.
    pub fn llama(config: &crate::LlamaConfig) -> Self {
        let ratio =
            config.layer_macs_per_token() as f64 / config.attention_macs_per_position() as f64;
        Self {
            attention_depth: (ratio / Self::ATTENTION_SLOWDOWN).max(1.0),
            window: config.sliding_window,
        }
    }

    /// Positions the token at position `pos` attends to (itself included).
    fn attended(&self, pos: usize) -> f64 {
        let n = pos + 1;
        self.window.map_or(n, |w| n.min(w)) as f64
    }

    /// The cost of `n` tokens at positions `pos..pos + n`.
    pub fn tokens(&self, pos: usize, n: usize) -> f64 {
        let attended: f64 = match self.window {
            // Sum of pos+1 ..= pos+n.
            None => n as f64 * (pos as f64 + (n as f64 + 1.0) / 2.0),
            Some(_) => (pos..pos + n).map(|p| self.attended(p)).sum(),
        };
        n as f64 + attended / self.attention_depth
    }

    /// The most tokens from position `pos` on whose cost fits `budget`.
    pub fn tokens_within(&self, pos: usize, budget: f64) -> usize {
        if budget < self.tokens(pos, 1) {
            return 0;
        }
        // Each token costs at least 1, so `budget` tokens bound the search.
        let (mut lo, mut hi) = (1usize, budget.floor() as usize);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if self.tokens(pos, mid) <= budget {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
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

#[cfg(test)]
mod tests {
    use super::*;

    const COST: StepCost = StepCost {
        attention_depth: 1000.0,
        window: None,
    };

    #[test]
    fn a_token_costs_its_weights_and_its_attention() {
        assert_eq!(COST.tokens(0, 1), 1.001);
        assert_eq!(COST.tokens(999, 1), 2.0);
        // 4 tokens at 10..14 attend to 11 + 12 + 13 + 14 positions.
        assert!((COST.tokens(10, 4) - (4.0 + 50.0 / 1000.0)).abs() < 1e-12);
        let windowed = StepCost {
            window: Some(100),
            ..COST
        };
        assert!((windowed.tokens(5000, 2) - 2.2).abs() < 1e-12);
        assert!((windowed.tokens(98, 3) - (3.0 + 299.0 / 1000.0)).abs() < 1e-12);
    }

    #[test]
    fn tokens_within_is_the_most_that_fit() {
        for pos in [0, 1, 700, 4000, 8000] {
            for budget in [0.5, 1.0, 2.0, 64.0, 512.0, 2048.0] {
                for cost in [
                    COST,
                    StepCost {
                        window: Some(512),
                        ..COST
                    },
                ] {
                    let n = cost.tokens_within(pos, budget);
                    if n > 0 {
                        assert!(cost.tokens(pos, n) <= budget, "{pos} {budget}");
                    }
                    assert!(cost.tokens(pos, n + 1) > budget, "{pos} {budget}");
                }
            }
        }
        // Deep in a prompt, the same budget buys fewer tokens.
        assert_eq!(COST.tokens_within(0, 512.0), 422);
        assert_eq!(COST.tokens_within(8000, 512.0), 56);
    }

    #[test]
    fn smollm2_attention_depth_is_near_the_measured_one() {
        let config = crate::LlamaConfig {
            architecture: "llama".into(),
            n_layers: 30,
            n_embd: 576,
            n_ff: 1536,
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            vocab_size: 49152,
            context_length: 8192,
            rms_eps: 1e-5,
            rope_freq_base: 1e5,
            rope_linear_scale: 1.0,
            rope_freq_factors: None,
            sliding_window: None,
            tie_word_embeddings: Some(true),
        };
        assert_eq!(config.kv_bytes_per_token(crate::KvCacheDtype::F32), 46_080);
        assert_eq!(config.kv_bytes_per_token(crate::KvCacheDtype::F16), 23_040);
        let depth = StepCost::llama(&config).attention_depth;
        assert!((1_000.0..1_050.0).contains(&depth), "{depth}");
    }
}
