//! Prompt caching across requests (llama.cpp server's `cache_prompt`,
//! vLLM's prefix caching, in its simplest form): the key/value cache of a
//! prompt, kept after its prefill, so that a later prompt that extends it
//! prefills only the new tokens.
//!
//! Only prompts that ask (`cache_prompt`) are kept, and only as their
//! prefill left them: a prefill's rows do not depend on how the prompt was
//! chunked, so a prompt continued from a kept prefix gets the same bits as
//! one prefilled whole (tested in `tests/exactness.rs`). Decoded tokens are
//! never kept, since on candle's f32 matmul a one-row step rounds
//! differently. The client's structured output restarts its stream after
//! the tokens it accepted; with this, a restart costs those tokens, not the
//! whole prompt again.
//!
//! Entries are keyed by (encrypted) token IDs and bounded by the bytes
//! their caches hold, oldest evicted first.

use std::collections::VecDeque;

use crate::kv_cache::KvCache;

/// Kept prompt caches.
pub struct PrefixCache {
    /// (prompt, its cache, the cache's bytes), oldest first.
    entries: VecDeque<(Vec<u32>, KvCache, usize)>,
    /// Most bytes kept across entries; 0 disables.
    capacity: usize,
    stored: usize,
}

/// Fewest tokens a continued prompt feeds: a prefill chunk of one row
/// would round as a decode step does.
const MIN_FED: usize = 2;

impl PrefixCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            capacity,
            stored: 0,
        }
    }

    /// Takes the longest kept prompt that `prompt` extends: how many of
    /// its positions to reuse, and its cache cut to them. At least two
    /// tokens are left to feed, so a prompt one token longer than a kept
    /// one reuses all but its last position.
    pub fn take_longest(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let (best, n) = self.longest(prompt)?;
        let (_, mut cache, bytes) = self.entries.remove(best)?;
        self.stored -= bytes;
        cache.truncate(n);
        Some((n, cache))
    }

    /// [`Self::take_longest`], but a copy: the kept prompt stays, now the
    /// newest, for the next request that extends it.
    pub fn copy_longest(&mut self, prompt: &[u32]) -> Option<(usize, KvCache)> {
        let (best, n) = self.longest(prompt)?;
        let entry = self.entries.remove(best)?;
        let mut cache = entry.1.clone();
        self.entries.push_back(entry);
        cache.truncate(n);
        Some((n, cache))
    }

    /// The entry `prompt` extends longest, and how many positions to reuse.
    fn longest(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        let reuse = |tokens: &[u32]| tokens.len().min(prompt.len().saturating_sub(MIN_FED));
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (tokens, _, _))| {
                tokens.len() < prompt.len() && prompt.starts_with(tokens) && reuse(tokens) > 0
            })
            .max_by_key(|(_, (tokens, _, _))| tokens.len())
            .map(|(i, (tokens, _, _))| (i, reuse(tokens)))
    }

    /// Keeps `cache`, which holds exactly `tokens` in `bytes`, evicting the
    /// oldest entries past the capacity. A cache larger than the capacity
    /// is not kept.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: KvCache, bytes: usize) {
        if bytes > self.capacity || tokens.len() < MIN_FED {
            return;
        }
        if let Some(i) = self.entries.iter().position(|(t, _, _)| *t == tokens) {
            if let Some((_, _, b)) = self.entries.remove(i) {
                self.stored -= b;
            }
        }
        while self.stored + bytes > self.capacity {
            match self.entries.pop_front() {
                Some((_, _, b)) => self.stored -= b,
                None => break,
            }
        }
        self.stored += bytes;
        self.entries.push_back((tokens, cache, bytes));
    }

    /// Whether `tokens` is kept, exactly.
    pub fn contains(&self, tokens: &[u32]) -> bool {
        self.entries.iter().any(|(t, _, _)| t == tokens)
    }

    /// Bytes kept now.
    pub fn stored_bytes(&self) -> usize {
        self.stored
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> KvCache {
        KvCache::new(1, 64, crate::KvCacheDtype::F16)
    }

    #[test]
    fn the_longest_extended_prefix_is_taken_and_the_oldest_evicted() {
        let mut c = PrefixCache::new(100);
        c.insert(vec![1, 2, 3], cache(), 30);
        c.insert(vec![1, 2, 3, 4, 5], cache(), 50);
        assert_eq!(c.stored_bytes(), 80);
        // Extends both; the longer wins and leaves the cache.
        let taken = c.take_longest(&[1, 2, 3, 4, 5, 6, 7]).map(|(n, _)| n);
        assert_eq!(taken, Some(5));
        assert_eq!(c.stored_bytes(), 30);
        // One new token: all but the kept prompt's last position, so two
        // rows are fed. A prompt that diverges matches nothing.
        assert!(c.take_longest(&[1, 9, 3, 4, 5]).is_none());
        assert_eq!(c.take_longest(&[1, 2, 3, 4]).map(|(n, _)| n), Some(2));
        c.insert(vec![1, 2, 3], cache(), 30);
        // Past the capacity, the oldest goes.
        c.insert(vec![7; 8], cache(), 80);
        assert_eq!(c.stored_bytes(), 80);
        assert!(c.take_longest(&[1, 2, 3, 4, 5]).is_none());
        // Too large to keep at all.
        c.insert(vec![5; 11], cache(), 101);
        assert_eq!(c.stored_bytes(), 80);
    }

    #[test]
    fn a_copied_prompt_stays_kept_and_becomes_the_newest() {
        let mut c = PrefixCache::new(100);
        c.insert(vec![1, 2, 3], cache(), 30);
        c.insert(vec![4, 5, 6], cache(), 50);
        assert_eq!(c.copy_longest(&[1, 2, 3, 4]).map(|(n, _)| n), Some(2));
        assert_eq!(c.stored_bytes(), 80);
        assert!(c.contains(&[1, 2, 3]) && !c.contains(&[1, 2]));
        // Past the capacity, the other one, now the oldest, goes.
        c.insert(vec![7; 4], cache(), 40);
        assert_eq!(c.stored_bytes(), 70);
        assert!(c.copy_longest(&[1, 2, 3, 4]).is_some());
        assert!(c.copy_longest(&[4, 5, 6, 7]).is_none());
    }
}
