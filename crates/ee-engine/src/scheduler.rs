//! Continuous batching: one engine thread advances every running sequence
//! in each forward step.
//!
//! Between steps it admits waiting sequences, oldest first, while fewer
//! than `max_batch` run and the KV pool has room for them; drops sequences
//! whose receiver is gone (a client that disconnected); and builds the next
//! step: one token for every decoding sequence, then chunks of waiting
//! prompts, oldest first, within a per-step cost budget, so a long prompt
//! never stalls the others' decoding. After the step, the sequences whose
//! prompt is done sample in parallel.
//!
//! **The KV pool** (vLLM's KV cache pool; llama.cpp's `-c` shared by its
//! slots) is a number of blocks of [`BLOCK_TOKENS`] positions, granted on
//! demand as in vLLM: a sequence is admitted with the blocks its prompt
//! fills, and a decoding sequence that reaches the end of its blocks is
//! granted more (twice what it holds, as its buffers grow, or one block
//! when the pool is short), so answers that stop early never hold their
//! `max_tokens`. A cache never grows past its grant
//! ([`KvCache::set_max_len`]), so running sequences never hold more KV
//! memory than the pool. When a decoding sequence needs a block and none
//! is free, the blocks the others were granted ahead of need are taken
//! back (their buffers shrink to what they fill); if that is not enough,
//! the youngest running sequence is preempted (vLLM's recompute
//! preemption): its cache is dropped, but for the prompt's rows of one
//! that asked to keep them (`cache_prompt`), which go to the prompt cache,
//! and it waits ahead of every new request, keeping its sampler and the
//! tokens it drew. When there is room again it prefills its prompt (or
//! continues from the kept one) and those tokens, and goes on. Our kernels
//! compute each row on its own, whatever else is in the step (tested for
//! every format they run), so the recomputed cache has the bits the first
//! one had, and a preempted sequence draws exactly what it would have drawn
//! alone; candle's kernels (`LoadOptions::candle_kernels`, for
//! comparisons) do not promise that. A
//! waiting sequence is admitted while its prompt's blocks fit and 1% of
//! the pool (at least a block) stays free, oldest first (none jumps the
//! queue); one whose prompt and `max_tokens` need more than the whole pool
//! fails.
//!
//! **The step budget** counts cost, not tokens ([`StepCost`]): a token deep
//! in a long prompt costs its attention too, so chunks shrink as a prompt
//! grows and a step late in an 8k-token prompt takes about as long as one
//! at its start.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use rayon::prelude::*;
use tokio::sync::mpsc as tokio_mpsc;

use crate::generate::{finish_reason, FinishReason};
use crate::kv_cache::{KvCache, BLOCK_TOKENS};
use crate::model::{compute_pool, CausalLm, SeqStep, StepCost};
use crate::prefix_cache::PrefixCache;
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::Error;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Sequences decoding together.
    pub max_batch: usize,
    /// Sequences waiting for a slot, preempted ones included; past it
    /// `submit` refuses.
    pub max_queue: usize,
    /// What one step may cost, decode and prefill together, in tokens at
    /// the start of a context ([`StepCost`]): deeper tokens cost more.
    /// Decoding sequences always step; prompts share what they leave, the
    /// oldest at least 16 tokens, so it always advances.
    pub step_token_budget: usize,
    /// Bytes of KV cache the running sequences may hold together.
    pub kv_cache_bytes: usize,
    /// Most bytes of prompt caches kept for requests that extend them
    /// ([`crate::prefix_cache`]); 0 keeps none.
    pub prompt_cache_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 256,
            step_token_budget: 512,
            kv_cache_bytes: 4 << 30,
            prompt_cache_bytes: 1 << 30,
        }
    }
}

impl SchedulerConfig {
    /// Whether `request`'s prompt is kept once prefilled: it asked, and
    /// prompt caching is on (a cache it would refuse is never copied).
    fn keeps_prompt(&self, request: &SequenceRequest) -> bool {
        request.cache_prompt && self.prompt_cache_bytes > 0
    }
}

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    /// Alternatives per token to report; `None` reports no logprobs.
    pub top_logprobs: Option<usize>,
    /// Start from a kept prompt this one extends, and keep this prompt's
    /// cache after its prefill (llama.cpp server's `cache_prompt`).
    pub cache_prompt: bool,
}

/// What the engine tells the submitter, in order.
#[derive(Debug, Clone)]
pub enum SequenceEvent {
    Token(Sampled),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// Live counts, for metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// Positions taken from kept prompt caches instead of prefilled, at
    /// each admission: a preempted sequence admitted again counts again.
    pub cached_prompt_tokens: AtomicUsize,
    /// Blocks of the KV pool granted to running sequences.
    pub kv_blocks_used: AtomicUsize,
    /// Blocks in the KV pool, each of [`BLOCK_TOKENS`] positions.
    pub kv_blocks_total: AtomicUsize,
    /// Sequences preempted to free KV blocks (a counter; vLLM's
    /// `num_preemptions`).
    pub preemptions: AtomicUsize,
}

struct Submission {
    request: SequenceRequest,
    events: tokio_mpsc::UnboundedSender<SequenceEvent>,
}

/// Handle to the engine thread. Cloning shares the thread; it stops when
/// the last handle is dropped and its sequences are done.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Submission>,
    stats: Arc<SchedulerStats>,
    max_queue: usize,
}

impl Scheduler {
    pub fn start(model: Arc<dyn CausalLm>, config: SchedulerConfig) -> Self {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(SchedulerStats::default());
        let block_bytes = model.kv_bytes_per_token().max(1) * BLOCK_TOKENS;
        stats
            .kv_blocks_total
            .store(config.kv_cache_bytes / block_bytes, Ordering::SeqCst);
        let max_queue = config.max_queue;
        let thread_stats = stats.clone();
        thread::Builder::new()
            .name("ee-engine".into())
            .spawn(move || EngineLoop::new(model, config, thread_stats).run(rx))
            .expect("spawning the engine thread");
        Self {
            tx,
            stats,
            max_queue,
        }
    }

    /// Queues a sequence; its events arrive on the returned receiver.
    /// Dropping the receiver cancels the sequence and frees its cache.
    pub fn submit(
        &self,
        request: SequenceRequest,
    ) -> Result<tokio_mpsc::UnboundedReceiver<SequenceEvent>, SubmitError> {
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queue {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(waiting));
        }
        let (events, rx) = tokio_mpsc::unbounded_channel();
        self.tx.send(Submission { request, events }).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Stopped
        })?;
        Ok(rx)
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Positions the whole KV pool holds: no sequence's prompt and
    /// `max_tokens` together may exceed it.
    pub fn kv_pool_tokens(&self) -> usize {
        self.stats.kv_blocks_total.load(Ordering::SeqCst) * BLOCK_TOKENS
    }
}

struct Running {
    request: SequenceRequest,
    events: tokio_mpsc::UnboundedSender<SequenceEvent>,
    cache: KvCache,
    /// Blocks of the KV pool granted to this sequence: its cache's limit.
    kv_blocks: usize,
    sampler: Sampler,
    /// The prompt, then every token drawn: what the cache holds once fed.
    tokens: Vec<u32>,
    /// Leading `tokens` in the cache.
    fed: usize,
    /// Admission order, kept through preemption: prompts prefill oldest
    /// first, and the youngest is preempted first.
    arrival: u64,
}

impl Running {
    fn generated(&self) -> usize {
        self.tokens.len() - self.request.prompt.len()
    }

    /// Decoding: the one token left to feed is the last one drawn. Any
    /// other sequence is prefilling its prompt, or, after a preemption,
    /// its prompt and what it drew.
    fn decoding(&self) -> bool {
        self.generated() > 0 && self.fed + 1 == self.tokens.len()
    }

    /// Blocks that hold every position the sequence may fill: its prompt
    /// and `max_tokens`.
    fn most_blocks(&self) -> usize {
        let positions = self
            .request
            .prompt
            .len()
            .saturating_add(self.request.max_tokens);
        positions.div_ceil(BLOCK_TOKENS)
    }

    fn finish(&self, reason: FinishReason) {
        let _ = self.events.send(SequenceEvent::Finished {
            reason,
            prompt_tokens: self.request.prompt.len(),
            completion_tokens: self.generated(),
        });
    }
}

struct EngineLoop {
    model: Arc<dyn CausalLm>,
    config: SchedulerConfig,
    stats: Arc<SchedulerStats>,
    waiting: VecDeque<Submission>,
    /// Preempted sequences, oldest first: admitted before any submission.
    preempted: VecDeque<Running>,
    /// In admission order.
    running: Vec<Running>,
    prompts: PrefixCache,
    cost: StepCost,
    kv_blocks_total: usize,
    arrivals: u64,
}

impl EngineLoop {
    fn new(model: Arc<dyn CausalLm>, config: SchedulerConfig, stats: Arc<SchedulerStats>) -> Self {
        Self {
            prompts: PrefixCache::new(config.prompt_cache_bytes),
            cost: model.step_cost(),
            kv_blocks_total: stats.kv_blocks_total.load(Ordering::SeqCst),
            model,
            config,
            stats,
            waiting: VecDeque::new(),
            preempted: VecDeque::new(),
            running: Vec::new(),
            arrivals: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Submission>) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() && self.preempted.is_empty() {
                match rx.recv() {
                    Ok(s) => self.waiting.push_back(s),
                    Err(_) => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.waiting.push_back(s);
            }
            self.drop_cancelled();
            self.admit();
            // A failed step, even a panic inside a kernel, fails its
            // sequences, never the engine thread: the next step runs.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("internal error in the forward step".to_owned()),
            };
            if let Some(msg) = failure {
                for seq in self.running.drain(..) {
                    let _ = seq.events.send(SequenceEvent::Failed(msg.clone()));
                }
            }
            self.stats
                .running
                .store(self.running.len(), Ordering::SeqCst);
            self.stats
                .kv_blocks_used
                .store(self.kv_blocks_used(), Ordering::SeqCst);
        }
    }

    fn kv_blocks_used(&self) -> usize {
        self.running.iter().map(|s| s.kv_blocks).sum()
    }

    fn drop_cancelled(&mut self) {
        let before = self.waiting.len() + self.preempted.len();
        self.waiting.retain(|s| !s.events.is_closed());
        self.preempted.retain(|s| !s.events.is_closed());
        let after = self.waiting.len() + self.preempted.len();
        self.stats
            .waiting
            .fetch_sub(before - after, Ordering::SeqCst);
        self.running.retain(|s| !s.events.is_closed());
    }

    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            // Preempted sequences first: they are older than any submission.
            if let Some(seq) = self.preempted.front() {
                let blocks = seq.tokens.len().div_ceil(BLOCK_TOKENS);
                if !self.admits(blocks) {
                    break;
                }
                let Some(mut seq) = self.preempted.pop_front() else {
                    break;
                };
                self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                // A copy: the kept prompt stays for the client's next
                // request, since this sequence's prefill keeps none.
                let kept = match seq.request.cache_prompt {
                    true => self.prompts.copy_longest(&seq.tokens),
                    false => None,
                };
                if let Some((fed, cache)) = kept {
                    self.count_cached(fed);
                    (seq.fed, seq.cache) = (fed, cache);
                }
                self.start(seq, blocks);
                continue;
            }
            let Some(next) = self.waiting.front() else {
                break;
            };
            // A request that can never run fails now, not after its wait.
            let request = &next.request;
            let valid = request
                .sampling
                .validate(self.model.vocab_size())
                .and_then(|()| check_request(self.model.as_ref(), request));
            let positions = request.prompt.len().saturating_add(request.max_tokens);
            let fits_pool = positions.div_ceil(BLOCK_TOKENS) <= self.kv_blocks_total;
            let blocks = request.prompt.len().div_ceil(BLOCK_TOKENS);
            if valid.is_ok() && fits_pool && !self.admits(blocks) {
                break; // waits for running sequences to free blocks
            }
            let Some(Submission { request, events }) = self.waiting.pop_front() else {
                break;
            };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            let checked = valid
                .and_then(|()| match fits_pool {
                    true => Ok(()),
                    false => Err(Error::KvPoolExceeded {
                        needed: positions,
                        pool: self.kv_blocks_total * BLOCK_TOKENS,
                    }),
                })
                .and_then(|()| Sampler::new(request.sampling.clone(), &request.prompt));
            let sampler = match checked {
                Ok(sampler) => sampler,
                Err(e) => {
                    let _ = events.send(SequenceEvent::Failed(e.to_string()));
                    continue;
                }
            };
            let kept = match request.cache_prompt {
                true => self.prompts.take_longest(&request.prompt),
                false => None,
            };
            let (fed, cache) = kept.unwrap_or_else(|| (0, self.model.new_cache()));
            self.count_cached(fed);
            self.arrivals += 1;
            let seq = Running {
                tokens: request.prompt.clone(),
                request,
                events,
                cache,
                kv_blocks: 0,
                sampler,
                fed,
                arrival: self.arrivals,
            };
            self.start(seq, blocks);
        }
    }

    fn count_cached(&self, positions: usize) {
        self.stats
            .cached_prompt_tokens
            .fetch_add(positions, Ordering::Relaxed);
    }

    /// Runs one forward step over the running sequences and samples.
    fn step(&mut self) -> Result<(), Error> {
        self.grow_decoding();
        let mut budget = self.config.step_token_budget.max(1) as f64;
        // (index into running, tokens this step, whether it samples after).
        let mut plan: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            if seq.decoding() {
                plan.push((i, seq.tokens[seq.fed..].to_vec(), true));
                budget -= self.cost.tokens(seq.fed, 1);
            }
        }
        let mut prefilling = false;
        for (i, seq) in self.running.iter().enumerate() {
            if !seq.decoding() {
                let left = seq.tokens.len() - seq.fed;
                let mut allowed = self.cost.tokens_within(seq.fed, budget);
                if !prefilling {
                    // The oldest prompt always advances, even when decoding
                    // or a low budget leaves it no room.
                    allowed = allowed.max(MIN_PREFILL_CHUNK);
                }
                let take = prefill_take(left, allowed);
                if take == 0 {
                    break; // oldest first: none jumps the queue
                }
                prefilling = true;
                let chunk = seq.tokens[seq.fed..seq.fed + take].to_vec();
                budget -= self.cost.tokens(seq.fed, take);
                plan.push((i, chunk, seq.fed + take == seq.tokens.len()));
            }
        }
        if plan.is_empty() {
            return Ok(());
        }
        plan.sort_by_key(|(i, _, _)| *i);
        let logits = {
            let mut caches: Vec<&mut KvCache> =
                self.running.iter_mut().map(|s| &mut s.cache).collect();
            let mut steps = Vec::with_capacity(plan.len());
            // Hand each planned sequence its own cache, in running order.
            let mut planned = plan.iter().peekable();
            for (i, cache) in caches.iter_mut().enumerate() {
                if let Some((_, tokens, _)) = planned.next_if(|(j, _, _)| *j == i) {
                    steps.push(SeqStep { tokens, cache });
                }
            }
            self.model.forward(&mut steps)?.to_vec2::<f32>()?
        };
        // Sequences sample in parallel: each has its own sampler, history and RNG.
        let mut to_sample = Vec::new();
        let mut planned = plan.iter().zip(&logits).peekable();
        for (i, seq) in self.running.iter_mut().enumerate() {
            let Some(((_, tokens, samples), row)) = planned.next_if(|((j, _, _), _)| *j == i)
            else {
                continue;
            };
            seq.fed += tokens.len();
            // Kept as the prompt's prefill left it, before any decode step.
            let keeps = self.config.keeps_prompt(&seq.request);
            if keeps && seq.generated() == 0 && seq.fed == seq.tokens.len() {
                let bytes = seq.cache.bytes();
                self.prompts
                    .insert(seq.request.prompt.clone(), seq.cache.clone(), bytes);
            }
            if *samples {
                to_sample.push((i, seq, row.as_slice()));
            }
        }
        let tie_keys = self.model.tie_keys();
        let sampled: Vec<(usize, Result<Sampled, Error>)> = compute_pool().install(|| {
            to_sample
                .into_par_iter()
                .map(|(i, seq, row)| {
                    let top_logprobs = seq.request.top_logprobs;
                    (i, seq.sampler.sample(row, tie_keys, top_logprobs))
                })
                .collect()
        });
        let mut finished = Vec::new();
        for (i, sampled) in sampled {
            let sampled = sampled?;
            let seq = &mut self.running[i];
            let token = sampled.token;
            seq.tokens.push(token);
            let _ = seq.events.send(SequenceEvent::Token(sampled));
            let context_full = seq.cache.len() >= self.model.context_length();
            let request = &seq.request;
            if let Some(reason) = finish_reason(
                token,
                &request.stop_token_ids,
                seq.generated(),
                request.max_tokens,
                context_full,
            ) {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.iter().rev() {
            self.running.remove(*i).finish(*reason);
        }
        Ok(())
    }
}

/// Prompt tokens the oldest prefilling sequence gets in every step, however
/// little budget is left: a prompt always advances.
const MIN_PREFILL_CHUNK: usize = 16;

/// Prompt tokens to feed this step: what the budget allows, but no chunk
/// of one row while more remain, and no last chunk of one. A one-row step
/// rounds as a decode step does on candle's f32 matmul, so a prompt's bits
/// would depend on how it was cut; with this they do not. (The oldest
/// prompt is always allowed [`MIN_PREFILL_CHUNK`], so it always advances.)
fn prefill_take(left: usize, budget: usize) -> usize {
    let take = left.min(budget);
    if take == left {
        return take;
    }
    let take = if left - take == 1 { take - 1 } else { take };
    if take < 2 {
        0
    } else {
        take
    }
}

/// Checks what the model itself constrains: IDs and context length.
fn check_request(model: &dyn CausalLm, r: &SequenceRequest) -> Result<(), Error> {
    if r.prompt.is_empty() {
        return Err(Error::Model("empty prompt".into()));
    }
    if let Some(&t) = r
        .prompt
        .iter()
        .chain(&r.stop_token_ids)
        .find(|&&t| t as usize >= model.vocab_size())
    {
        return Err(Error::TokenOutOfRange {
            token: t,
            vocab_size: model.vocab_size(),
        });
    }
    let needed = r.prompt.len() + r.max_tokens;
    if needed > model.context_length() {
        return Err(Error::ContextOverflow {
            needed,
            limit: model.context_length(),
        });
    }
    Ok(())
}

mod kv_pool;
#[cfg(test)]
mod tests;
