//! The KV pool's accounting: blocks granted at admission and as sequences
//! decode, and recompute preemption when none is free (the module docs of
//! `super` describe the policy).

use std::sync::atomic::Ordering;

use super::{EngineLoop, Running};
use crate::kv_cache::BLOCK_TOKENS;

impl EngineLoop {
    pub(super) fn kv_blocks_free(&self) -> usize {
        self.kv_blocks_total - self.kv_blocks_used()
    }

    /// Whether `blocks` more can be granted to a sequence being admitted:
    /// 1% of the pool, and at least a block, stays free for running
    /// sequences to grow into (vLLM's watermark), unless none runs.
    pub(super) fn admits(&self, blocks: usize) -> bool {
        let watermark = match self.running.is_empty() {
            true => 0,
            false => (self.kv_blocks_total / 100).max(1),
        };
        blocks.saturating_add(watermark) <= self.kv_blocks_free()
    }

    /// Grants `seq` its first blocks and runs it, in admission order.
    pub(super) fn start(&mut self, mut seq: Running, blocks: usize) {
        seq.kv_blocks = blocks;
        seq.cache.set_max_len(blocks * BLOCK_TOKENS);
        let at = self.running.partition_point(|s| s.arrival < seq.arrival);
        self.running.insert(at, seq);
    }

    /// Preempts running sequence `i`: frees its blocks and queues it ahead
    /// of every submission to prefill again. Its cache is dropped, but for
    /// a sequence that asked for its prompt to be kept (`cache_prompt`),
    /// whose prompt's rows (all from prefill steps) go to the prompt cache
    /// unless its prefill kept them already, to be continued from when it
    /// is admitted again.
    pub(super) fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        let mut cache = std::mem::replace(&mut seq.cache, self.model.new_cache());
        let prompt = &seq.request.prompt;
        let prefilled = seq.fed >= prompt.len();
        if self.config.keeps_prompt(&seq.request) && prefilled && !self.prompts.contains(prompt) {
            cache.set_max_len(prompt.len());
            let bytes = cache.bytes();
            self.prompts.insert(prompt.clone(), cache, bytes);
        }
        (seq.fed, seq.kv_blocks) = (0, 0);
        let at = self.preempted.partition_point(|s| s.arrival < seq.arrival);
        self.preempted.insert(at, seq);
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    /// Grants every decoding sequence whose next token is past its blocks
    /// more of them, oldest first: twice what it holds (its buffers double
    /// as they grow) up to what it may fill, or only the block it needs when
    /// the pool has not that much free. When not even that is free, the
    /// blocks other sequences were granted ahead of need are taken back
    /// (and it gets only the block it needs); only then is the youngest
    /// running sequence preempted, which may be the one that needs it.
    pub(super) fn grow_decoding(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let seq = &self.running[i];
            let needed = seq.tokens.len().div_ceil(BLOCK_TOKENS);
            if !seq.decoding() || needed <= seq.kv_blocks {
                i += 1;
                continue;
            }
            let wanted = (2 * seq.kv_blocks).clamp(needed, seq.most_blocks().max(needed));
            // Short of blocks: take back surplus, and grant no more.
            let short = needed - seq.kv_blocks > self.kv_blocks_free();
            if short {
                self.reclaim_surplus(needed - seq.kv_blocks);
            }
            while needed - self.running[i].kv_blocks > self.kv_blocks_free() {
                let youngest = self.running.len() - 1;
                self.preempt(youngest);
                if youngest == i {
                    return;
                }
            }
            let held = self.running[i].kv_blocks;
            let grant = match !short && wanted - held <= self.kv_blocks_free() {
                true => wanted,
                false => needed,
            };
            let seq = &mut self.running[i];
            seq.kv_blocks = grant;
            seq.cache.set_max_len(grant * BLOCK_TOKENS);
            i += 1;
        }
    }

    /// Takes back blocks granted ahead of need, youngest sequence first,
    /// until `blocks` are free or none is left to take: a sequence keeps
    /// the blocks its tokens fill, and its buffers shrink to them (a copy
    /// of what it holds, far cheaper than the recompute of a preemption).
    fn reclaim_surplus(&mut self, blocks: usize) {
        for j in (0..self.running.len()).rev() {
            if self.kv_blocks_free() >= blocks {
                return;
            }
            let seq = &mut self.running[j];
            let filled = seq.tokens.len().div_ceil(BLOCK_TOKENS);
            if seq.kv_blocks > filled {
                seq.kv_blocks = filled;
                seq.cache.set_max_len(filled * BLOCK_TOKENS);
            }
        }
    }
}
