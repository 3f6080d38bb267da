//! Per-sequence key/value cache.
//!
//! Each sequence owns its cache, so sequences of different lengths and
//! positions advance together in one batched forward step. Buffers grow by
//! doubling and are written in place, so a decode step costs O(new tokens)
//! rather than re-concatenating the whole history.
//!
//! Keys are stored in chunks of [`KEY_CHUNK`] positions, each chunk
//! transposed (`[n_kv_head][capacity / KEY_CHUNK][head_dim][KEY_CHUNK]`):
//! the attention kernel reads one dimension of a chunk's keys as a vector,
//! and a chunk's keys are one contiguous stretch of memory, read in order.
//! Values are `[n_kv_head][capacity][head_dim]`. Capacity is a multiple of
//! [`KEY_CHUNK`], so the kernel may read a whole chunk past the last key.

use candle_core::Tensor;

use crate::Error;

/// Positions per transposed key chunk.
pub(crate) const KEY_CHUNK: usize = 32;

/// Positions per block of the scheduler's KV pool: a cache's buffers hold
/// whole key chunks, so whole blocks.
pub const BLOCK_TOKENS: usize = KEY_CHUNK;

/// One layer's keys and values, laid out as the module docs say.
#[derive(Debug, Clone, Default)]
struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Tokens stored (identical across layers once a step completes).
    len: usize,
    capacity: usize,
    max_len: usize,
    n_kv_head: usize,
    head_dim: usize,
}

/// Everything one layer has cached for a sequence, after an append.
pub(crate) struct LayerView<'a> {
    /// `[n_kv_head][capacity / KEY_CHUNK][head_dim][KEY_CHUNK]`.
    pub keys: &'a [f32],
    /// `[n_kv_head][capacity][head_dim]`.
    pub values: &'a [f32],
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Positions cached, the new ones included.
    pub total: usize,
}

impl LayerView<'_> {
    /// Keys as a tensor `[n_kv_head, total, head_dim]` (for the reference
    /// path, which wants candle's layout).
    pub fn keys_tensor(&self) -> Result<Tensor, Error> {
        let (hd, chunks) = (self.head_dim, self.capacity / KEY_CHUNK);
        let mut k = Vec::with_capacity(self.n_kv_head * self.total * hd);
        for kv in 0..self.n_kv_head {
            for pos in 0..self.total {
                let chunk = (kv * chunks + pos / KEY_CHUNK) * hd * KEY_CHUNK;
                k.extend((0..hd).map(|d| self.keys[chunk + d * KEY_CHUNK + pos % KEY_CHUNK]));
            }
        }
        Ok(Tensor::from_vec(
            k,
            (self.n_kv_head, self.total, hd),
            &candle_core::Device::Cpu,
        )?)
    }

    /// Values as a tensor `[n_kv_head, total, head_dim]`.
    pub fn values_tensor(&self) -> Result<Tensor, Error> {
        let hd = self.head_dim;
        let mut v = Vec::with_capacity(self.n_kv_head * self.total * hd);
        for kv in 0..self.n_kv_head {
            v.extend_from_slice(&self.values[kv * self.capacity * hd..][..self.total * hd]);
        }
        Ok(Tensor::from_vec(
            v,
            (self.n_kv_head, self.total, hd),
            &candle_core::Device::Cpu,
        )?)
    }
}

const MIN_CAPACITY: usize = 64;

impl KvCache {
    /// The bytes its buffers hold (capacity, not length: buffers grow by
    /// doubling).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.keys.len() + l.values.len()) * std::mem::size_of::<f32>())
            .sum()
    }

    pub fn new(n_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); n_layers],
            len: 0,
            capacity: 0,
            max_len,
            n_kv_head: 0,
            head_dim: 0,
        }
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`[n_kv_head, n_new, head_dim]`) to `layer` and returns
    /// a view of everything cached so far for that layer.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<LayerView<'_>, Error> {
        let (n_kv, n_new, hd) = k.dims3()?;
        if v.dims3()? != (n_kv, n_new, hd) {
            return Err(Error::Model("keys and values differ in shape".into()));
        }
        let new_len = self.len + n_new;
        if new_len > self.max_len {
            return Err(Error::ContextOverflow {
                needed: new_len,
                limit: self.max_len,
            });
        }
        if self.capacity > 0 && (n_kv, hd) != (self.n_kv_head, self.head_dim) {
            return Err(Error::Model("the cache was made for other heads".into()));
        }
        (self.n_kv_head, self.head_dim) = (n_kv, hd);
        if new_len > self.capacity {
            self.grow(new_len);
        }
        let (capacity, chunks) = (self.capacity, self.capacity / KEY_CHUNK);
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Model("cache layer missing".into()))?;
        let k: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
        for kv in 0..n_kv {
            for i in 0..n_new {
                let pos = self.len + i;
                let row = &k[(kv * n_new + i) * hd..][..hd];
                let chunk = (kv * chunks + pos / KEY_CHUNK) * hd * KEY_CHUNK;
                for (d, &x) in row.iter().enumerate() {
                    slot.keys[chunk + d * KEY_CHUNK + pos % KEY_CHUNK] = x;
                }
                slot.values[(kv * capacity + pos) * hd..][..hd]
                    .copy_from_slice(&v[(kv * n_new + i) * hd..][..hd]);
            }
        }
        Ok(LayerView {
            keys: &slot.keys,
            values: &slot.values,
            n_kv_head: n_kv,
            head_dim: hd,
            capacity,
            total: new_len,
        })
    }

    /// Forgets every position from `len` on (the next token goes there);
    /// their buffers are overwritten as new tokens arrive.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Marks `n_new` tokens as committed once every layer has appended them.
    pub fn advance(&mut self, n_new: usize) {
        self.len += n_new;
    }

    /// The most positions this sequence may hold: appends past it fail
    /// with [`Error::ContextOverflow`], and its buffers never grow past it
    /// (rounded up to a whole [`KEY_CHUNK`]). Lowering it below the buffers'
    /// capacity shrinks them; positions past the new limit are forgotten.
    /// The scheduler sets it to what a sequence reserved of the KV pool.
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
        self.len = self.len.min(max_len);
        let cap = max_len.next_multiple_of(KEY_CHUNK);
        if self.capacity > cap {
            self.reallocate(cap);
        }
    }

    /// Reallocates every layer for at least `needed` positions, keeping
    /// what is cached.
    fn grow(&mut self, needed: usize) {
        let capacity = needed
            .max(self.capacity * 2)
            .max(MIN_CAPACITY)
            .min(self.max_len)
            .next_multiple_of(KEY_CHUNK);
        self.reallocate(capacity);
    }

    /// Gives every layer buffers of `capacity` positions (a multiple of
    /// [`KEY_CHUNK`]), keeping the first `min(capacity, old capacity)`:
    /// each kv-head's chunks and rows move to their new places.
    fn reallocate(&mut self, capacity: usize) {
        let (n_kv, hd, old) = (self.n_kv_head, self.head_dim, self.capacity);
        let run = old.min(capacity) * hd;
        for slot in &mut self.layers {
            let mut keys = vec![0f32; n_kv * capacity * hd];
            let mut values = vec![0f32; n_kv * capacity * hd];
            if !slot.keys.is_empty() {
                for kv in 0..n_kv {
                    // Chunks keep their layout; a kv-head's run of chunks moves.
                    keys[kv * capacity * hd..][..run]
                        .copy_from_slice(&slot.keys[kv * old * hd..][..run]);
                    values[kv * capacity * hd..][..run]
                        .copy_from_slice(&slot.values[kv * old * hd..][..run]);
                }
            }
            *slot = LayerCache { keys, values };
        }
        self.capacity = capacity;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn appends_across_growth_read_back_as_written() {
        let (n_kv, hd) = (2, 3);
        let mut cache = KvCache::new(1, 500);
        let mut all_k = Vec::new();
        let mut total = 0;
        for (step, n) in [5usize, 1, 70, 1, 100].into_iter().enumerate() {
            let k: Vec<f32> = (0..n_kv * n * hd)
                .map(|i| (step * 1000 + i) as f32)
                .collect();
            let t = Tensor::from_vec(k.clone(), (n_kv, n, hd), &Device::Cpu).unwrap();
            all_k.push(t.clone());
            let view = cache.append(0, &t, &(t.clone() * 2.0).unwrap()).unwrap();
            total += n;
            assert_eq!(view.total, total);
            let want = Tensor::cat(&all_k, 1).unwrap();
            let got = view.keys_tensor().unwrap();
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
            let values = view.values_tensor().unwrap();
            assert_eq!(
                values.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                (want * 2.0)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
            cache.advance(n);
        }
        let too_many =
            Tensor::zeros((n_kv, 400, hd), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            cache.append(0, &too_many, &too_many),
            Err(Error::ContextOverflow { .. })
        ));
    }

    #[test]
    fn a_lower_limit_shrinks_the_buffers_and_keeps_what_fits() {
        let (n_kv, hd) = (2, 4);
        let mut cache = KvCache::new(2, 1000);
        let k: Vec<f32> = (0..n_kv * 200 * hd).map(|i| i as f32).collect();
        let t = Tensor::from_vec(k, (n_kv, 200, hd), &Device::Cpu).unwrap();
        for layer in 0..2 {
            cache.append(layer, &t, &t).unwrap();
        }
        cache.advance(200);
        let before = cache.bytes();
        cache.set_max_len(70);
        assert_eq!(cache.len(), 70);
        assert_eq!(
            cache.bytes(),
            2 * 2 * n_kv * 96 * hd * 4,
            "96 = 70 in chunks"
        );
        assert!(cache.bytes() < before);
        let view = cache.append(0, &t.narrow(1, 0, 0).unwrap(), &t.narrow(1, 0, 0).unwrap());
        let view = view.unwrap();
        let want = t.narrow(1, 0, 70).unwrap().flatten_all().unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        let got = view.keys_tensor().unwrap().flatten_all().unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), want);
        let got = view.values_tensor().unwrap().flatten_all().unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), want);
        let one = t.narrow(1, 0, 1).unwrap();
        assert!(matches!(
            cache.append(0, &one, &one),
            Err(Error::ContextOverflow {
                needed: 71,
                limit: 70
            })
        ));
    }

    #[test]
    fn a_context_that_is_not_a_whole_chunk_still_leaves_a_whole_chunk_to_read() {
        let mut cache = KvCache::new(1, 100);
        let t = Tensor::ones((1, 100, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let view = cache.append(0, &t, &t).unwrap();
        assert_eq!(view.total, 100);
        assert_eq!(view.capacity % KEY_CHUNK, 0);
        assert!(view.keys.len() >= view.capacity * 8 && view.capacity >= 100);
    }
}
