//! Per-sequence key/value cache.
//!
//! Each sequence owns its cache, so sequences of different lengths and
//! positions advance together in one batched forward step. Buffers grow by
//! doubling and are written in place, so a decode step costs O(new tokens)
//! rather than re-concatenating the whole history.

use candle_core::{DType, Device, Tensor};

use crate::Error;

/// Keys and values of one layer: `[n_kv_head, capacity, head_dim]`.
#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// The cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Tokens stored (identical across layers once a step completes).
    len: usize,
    capacity: usize,
    max_len: usize,
}

const MIN_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(n_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
            capacity: 0,
            max_len,
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
    /// views of everything cached so far for that layer.
    pub fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), Error> {
        let (n_kv, n_new, head_dim) = k.dims3()?;
        let new_len = self.len + n_new;
        if new_len > self.max_len {
            return Err(Error::ContextOverflow {
                needed: new_len,
                limit: self.max_len,
            });
        }
        if new_len > self.capacity {
            self.grow(new_len, n_kv, head_dim, k.device())?;
        }
        let slot = self.layers[layer]
            .as_mut()
            .ok_or_else(|| Error::Model("cache layer missing".into()))?;
        slot.k.slice_set(&k.contiguous()?, 1, self.len)?;
        slot.v.slice_set(&v.contiguous()?, 1, self.len)?;
        Ok((slot.k.narrow(1, 0, new_len)?, slot.v.narrow(1, 0, new_len)?))
    }

    /// Marks `n_new` tokens as committed once every layer has appended them.
    pub fn advance(&mut self, n_new: usize) {
        self.len += n_new;
    }

    fn grow(
        &mut self,
        needed: usize,
        n_kv: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<(), Error> {
        let capacity = needed
            .max(self.capacity * 2)
            .max(MIN_CAPACITY)
            .min(self.max_len);
        for slot in &mut self.layers {
            let fresh = || Tensor::zeros((n_kv, capacity, head_dim), DType::F32, device);
            let (k, v) = (fresh()?, fresh()?);
            if let Some(old) = slot.as_ref() {
                if self.len > 0 {
                    k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
            }
            *slot = Some(LayerCache { k, v });
        }
        self.capacity = capacity;
        Ok(())
    }
}
