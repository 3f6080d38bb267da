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
//!
//! Elements are f16 by default ([`KvCacheDtype`]), as llama.cpp stores
//! them: keys and values are rounded to nearest once, when appended, and
//! read back exactly. Every path reads the same rounded values (a prompt's
//! own keys too, which are appended before attention), so rounding depends
//! only on the values, never on the batch or the chunk.

use std::str::FromStr;

use candle_core::Tensor;
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::Error;

/// Positions per transposed key chunk.
pub(crate) const KEY_CHUNK: usize = 32;

/// Positions per block of the scheduler's KV pool: a cache's buffers hold
/// whole key chunks, so whole blocks.
pub const BLOCK_TOKENS: usize = KEY_CHUNK;

/// The element type of the KV cache: llama.cpp's `--cache-type-k/-v`,
/// vLLM's `--kv-cache-dtype`. f16, llama.cpp's default, takes half the
/// memory of f32 and half the bandwidth that attention reads at depth; it
/// rounds each key and value element to nearest, within 2^-11 of itself
/// for magnitudes from 6.1e-5 to 65504, within 3e-8 below, and to infinity
/// above (as llama.cpp's). f32 keeps them as computed (for comparisons with
/// candle's reference model, which keeps f32). Parsed from `f16` or `f32`
/// (any case, or `float16`, `half`, `float32`, `float`), in TOML too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum KvCacheDtype {
    #[default]
    F16,
    F32,
}

impl KvCacheDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvCacheDtype::F16 => 2,
            KvCacheDtype::F32 => 4,
        }
    }

    /// `f16` or `f32`, as configured.
    pub fn name(self) -> &'static str {
        match self {
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::F32 => "f32",
        }
    }
}

impl std::fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TryFrom<String> for KvCacheDtype {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl FromStr for KvCacheDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" | "half" => Ok(KvCacheDtype::F16),
            "f32" | "float32" | "float" => Ok(KvCacheDtype::F32),
            _ => Err(format!("unknown KV cache dtype {s:?}: expected f16 or f32")),
        }
    }
}

/// One layer's keys or values, in the cache's element type.
#[derive(Debug, Clone)]
enum Buffer {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

/// A layer's keys or values as the attention kernel reads them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KvSlice<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl KvSlice<'_> {
    /// Element `i`, widened exactly.
    fn get(self, i: usize) -> f32 {
        match self {
            KvSlice::F16(x) => x[i].to_f32(),
            KvSlice::F32(x) => x[i],
        }
    }
}

impl Buffer {
    fn zeros(dtype: KvCacheDtype, len: usize) -> Self {
        match dtype {
            KvCacheDtype::F16 => Buffer::F16(vec![f16::ZERO; len]),
            KvCacheDtype::F32 => Buffer::F32(vec![0.0; len]),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buffer::F16(x) => x.len(),
            Buffer::F32(x) => x.len(),
        }
    }

    fn as_slice(&self) -> KvSlice<'_> {
        match self {
            Buffer::F16(x) => KvSlice::F16(x),
            Buffer::F32(x) => KvSlice::F32(x),
        }
    }
}

/// One layer's keys and values, laid out as the module docs say.
#[derive(Debug, Clone)]
struct LayerCache {
    keys: Buffer,
    values: Buffer,
}

/// The cache of one sequence across all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    dtype: KvCacheDtype,
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
    pub keys: KvSlice<'a>,
    /// `[n_kv_head][capacity][head_dim]`.
    pub values: KvSlice<'a>,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Positions cached, the new ones included.
    pub total: usize,
}

impl LayerView<'_> {
    /// Keys as an f32 tensor `[n_kv_head, total, head_dim]` (for the
    /// reference path, which wants candle's layout).
    pub fn keys_tensor(&self) -> Result<Tensor, Error> {
        let (hd, chunks) = (self.head_dim, self.capacity / KEY_CHUNK);
        let mut k = Vec::with_capacity(self.n_kv_head * self.total * hd);
        for kv in 0..self.n_kv_head {
            for pos in 0..self.total {
                let chunk = (kv * chunks + pos / KEY_CHUNK) * hd * KEY_CHUNK;
                k.extend((0..hd).map(|d| self.keys.get(chunk + d * KEY_CHUNK + pos % KEY_CHUNK)));
            }
        }
        Ok(Tensor::from_vec(
            k,
            (self.n_kv_head, self.total, hd),
            &candle_core::Device::Cpu,
        )?)
    }

    /// Values as an f32 tensor `[n_kv_head, total, head_dim]`.
    pub fn values_tensor(&self) -> Result<Tensor, Error> {
        let hd = self.head_dim;
        let mut v = Vec::with_capacity(self.n_kv_head * self.total * hd);
        for kv in 0..self.n_kv_head {
            let first = kv * self.capacity * hd;
            v.extend((first..first + self.total * hd).map(|i| self.values.get(i)));
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
        let elements: usize = self
            .layers
            .iter()
            .map(|l| l.keys.len() + l.values.len())
            .sum();
        elements * self.dtype.size()
    }

    /// An empty cache of `n_layers` layers, for at most `max_len`
    /// positions, holding `dtype` elements.
    pub fn new(n_layers: usize, max_len: usize, dtype: KvCacheDtype) -> Self {
        let empty = LayerCache {
            keys: Buffer::zeros(dtype, 0),
            values: Buffer::zeros(dtype, 0),
        };
        Self {
            layers: vec![empty; n_layers],
            dtype,
            len: 0,
            capacity: 0,
            max_len,
            n_kv_head: 0,
            head_dim: 0,
        }
    }

    /// The element type it stores.
    pub fn dtype(&self) -> KvCacheDtype {
        self.dtype
    }

    /// Tokens already cached: the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`[n_kv_head, n_new, head_dim]`, f32) to `layer`,
    /// rounded to the cache's element type, and returns a view of
    /// everything cached so far for that layer.
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
        let at = Placement {
            n_kv,
            n_new,
            hd,
            first: self.len,
            capacity: self.capacity,
        };
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Model("cache layer missing".into()))?;
        let k: Vec<f32> = k.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
        match (&mut slot.keys, &mut slot.values) {
            (Buffer::F32(keys), Buffer::F32(values)) => at.write(keys, values, &k, &v),
            (Buffer::F16(keys), Buffer::F16(values)) => {
                // Rounded a whole step at a time (vectorized where the CPU can).
                let round = |x: &[f32]| {
                    let mut h = vec![f16::ZERO; x.len()];
                    h.convert_from_f32_slice(x);
                    h
                };
                at.write(keys, values, &round(&k), &round(&v))
            }
            _ => return Err(Error::Model("keys and values differ in type".into())),
        }
        Ok(LayerView {
            keys: slot.keys.as_slice(),
            values: slot.values.as_slice(),
            n_kv_head: n_kv,
            head_dim: hd,
            capacity: self.capacity,
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
    /// The scheduler sets it to the blocks of the KV pool it granted.
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
        let moved = |buffer: &Buffer| match buffer {
            Buffer::F16(x) => Buffer::F16(moved(x, n_kv, hd, old, capacity)),
            Buffer::F32(x) => Buffer::F32(moved(x, n_kv, hd, old, capacity)),
        };
        for slot in &mut self.layers {
            *slot = LayerCache {
                keys: moved(&slot.keys),
                values: moved(&slot.values),
            };
        }
        self.capacity = capacity;
    }
}

/// `old`'s kv-heads (`old_cap` positions each; empty before the first
/// append) in buffers of `capacity` positions: each head's first
/// `min(old_cap, capacity)` positions keep their layout (key chunks move
/// whole), the rest is zero.
fn moved<E: Copy + Default>(
    old: &[E],
    n_kv: usize,
    hd: usize,
    old_cap: usize,
    capacity: usize,
) -> Vec<E> {
    let mut new = vec![E::default(); n_kv * capacity * hd];
    if !old.is_empty() {
        let run = old_cap.min(capacity) * hd;
        for kv in 0..n_kv {
            new[kv * capacity * hd..][..run].copy_from_slice(&old[kv * old_cap * hd..][..run]);
        }
    }
    new
}

/// Where one append's `n_new` positions from `first` go, in buffers of
/// `capacity` positions.
struct Placement {
    n_kv: usize,
    n_new: usize,
    hd: usize,
    first: usize,
    capacity: usize,
}

impl Placement {
    /// Writes `k` and `v` (`[n_kv][n_new][hd]`): keys into their chunks,
    /// transposed, values as rows.
    fn write<E: Copy>(&self, keys: &mut [E], values: &mut [E], k: &[E], v: &[E]) {
        let (hd, chunks) = (self.hd, self.capacity / KEY_CHUNK);
        for kv in 0..self.n_kv {
            for i in 0..self.n_new {
                let pos = self.first + i;
                let row = (kv * self.n_new + i) * hd;
                let chunk = (kv * chunks + pos / KEY_CHUNK) * hd * KEY_CHUNK;
                for (d, &x) in k[row..][..hd].iter().enumerate() {
                    keys[chunk + d * KEY_CHUNK + pos % KEY_CHUNK] = x;
                }
                values[(kv * self.capacity + pos) * hd..][..hd].copy_from_slice(&v[row..][..hd]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `t` rounded as a cache of `dtype` stores it.
    fn rounded(t: Tensor, dtype: KvCacheDtype) -> Vec<f32> {
        let t = match dtype {
            KvCacheDtype::F16 => t.to_dtype(candle_core::DType::F16).unwrap(),
            KvCacheDtype::F32 => t,
        };
        let t = t.to_dtype(candle_core::DType::F32).unwrap();
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn appends_across_growth_read_back_as_written() {
        for dtype in [KvCacheDtype::F16, KvCacheDtype::F32] {
            appends_read_back(dtype);
        }
    }

    fn appends_read_back(dtype: KvCacheDtype) {
        let (n_kv, hd) = (2, 3);
        let mut cache = KvCache::new(1, 500, dtype);
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
                rounded(want.clone(), dtype),
                "{dtype}"
            );
            let values = view.values_tensor().unwrap();
            assert_eq!(
                values.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                rounded((want * 2.0).unwrap(), dtype),
                "{dtype}"
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
        // Whole numbers under 2048: f16 holds them exactly.
        let mut cache = KvCache::new(2, 1000, KvCacheDtype::F16);
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
            2 * 2 * n_kv * 96 * hd * 2,
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
        let mut cache = KvCache::new(1, 100, KvCacheDtype::F16);
        let t = Tensor::ones((1, 100, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let view = cache.append(0, &t, &t).unwrap();
        assert_eq!(view.total, 100);
        assert_eq!(view.capacity % KEY_CHUNK, 0);
        let KvSlice::F16(keys) = view.keys else {
            panic!("an f16 cache")
        };
        assert!(keys.len() >= view.capacity * 8 && view.capacity >= 100);
    }
}
