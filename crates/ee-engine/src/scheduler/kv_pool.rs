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

    /// Preempts running sequence `i`: drops its cache, freeing its blocks,
    /// and queues it ahead of every submission to prefill again.
    pub(super) fn preempt(&mut self, i: usize) {
        let mut seq = self.running.remove(i);
        seq.cache = self.model.new_cache();
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
    /// youngest running sequence is preempted, which may be the one that
    /// needs it.
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
            while needed - self.running[i].kv_blocks > self.kv_blocks_free() {
                let youngest = self.running.len() - 1;
                self.preempt(youngest);
                if youngest == i {
                    return;
                }
            }
            let held = self.running[i].kv_blocks;
            let grant = match wanted - held <= self.kv_blocks_free() {
                true => wanted,
                false => needed,
            };
            let seq = &mut self.running[i];
            seq.kv_blocks = grant;
            seq.cache.set_max_len(grant * BLOCK_TOKENS);
            i += 1;
        }
    }
}
