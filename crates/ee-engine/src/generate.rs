//! Single-sequence generation: prefill, then decode until a stop token or the
//! token budget. The server's scheduler drives [`CausalLm::forward`]
//! directly to batch many sequences; this loop serves the CLI, the benchmark
//! and the exactness tests.

use crate::model::CausalLm;
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::Error;

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated (it is included in the output).
    Stop,
    /// `max_tokens` was reached, or the context is full.
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Prefill is fed in chunks of this many tokens.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            stop_token_ids: Vec::new(),
            sampling: SamplingParams::greedy(),
            prefill_chunk: 512,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<Sampled>,
    pub finish_reason: FinishReason,
}

impl Generation {
    pub fn token_ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|s| s.token).collect()
    }
}

/// Generates from `prompt`, calling `on_token` as each token is drawn.
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(&Sampled),
) -> Result<Generation, Error> {
    if prompt.is_empty() {
        return Err(Error::Model("empty prompt".into()));
    }
    opts.sampling.validate(model.vocab_size())?;
    let mut sampler = Sampler::new(opts.sampling.clone(), prompt)?;
    let mut cache = model.new_cache();
    let mut logits = Vec::new();
    for chunk in prompt.chunks(opts.prefill_chunk.max(1)) {
        logits = model.forward_one(chunk, &mut cache)?;
    }
    let mut tokens = Vec::new();
    if opts.max_tokens == 0 {
        return Ok(Generation {
            tokens,
            finish_reason: FinishReason::Length,
        });
    }
    loop {
        let sampled = sampler.sample(&logits, model.tie_keys(), None)?;
        on_token(&sampled);
        let token = sampled.token;
        tokens.push(sampled);
        let context_full = cache.len() >= model.context_length();
        let finished = finish_reason(
            token,
            &opts.stop_token_ids,
            tokens.len(),
            opts.max_tokens,
            context_full,
        );
        if let Some(finish_reason) = finished {
            return Ok(Generation {
                tokens,
                finish_reason,
            });
        }
        logits = model.forward_one(&[token], &mut cache)?;
    }
}

/// Whether a sequence ends once it has drawn `token`, its `generated`-th:
/// a stop token stops it (and is kept), else the token budget or a full
/// context ends it. The scheduler and [`generate`] share this rule.
pub(crate) fn finish_reason(
    token: u32,
    stop_token_ids: &[u32],
    generated: usize,
    max_tokens: usize,
    context_full: bool,
) -> Option<FinishReason> {
    if stop_token_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if generated >= max_tokens || context_full {
        Some(FinishReason::Length)
    } else {
        None
    }
}
