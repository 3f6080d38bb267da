//! Llama/Mistral forward pass over quantized GGUF weights, built for
//! continuous batching.
//!
//! One [`LlamaModel::forward`] call advances any number of sequences, each
//! with its own KV cache and position, by any number of tokens each (a
//! prefill chunk or a single decode token). Token rows of all sequences are
//! stacked for the weight matmuls; only attention runs per sequence, one
//! sequence per rayon task. Every matmul computes each activation row
//! independently, so a sequence's logits do not depend on what else is in
//! the batch.
//!
//! The model is agnostic to EE: an encrypted artifact is loaded and run
//! exactly like a plaintext one.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use ee_core::gguf::GgufHeader;
use rayon::prelude::*;

use crate::config::LlamaConfig;
use crate::kv_cache::KvCache;
use crate::quant::QuantMatrix;
use crate::Error;

/// A weight matrix: our runtime-dispatched kernels where we have them
/// (Q4_1, Q8_0), candle's QMatMul otherwise.
enum Linear {
    Ours(QuantMatrix),
    Candle(QMatMul),
}

impl Linear {
    fn new(name: &str, t: QTensor, opts: &LoadOptions) -> Result<Self, Error> {
        if QuantMatrix::supports(t.dtype()) && !opts.candle_kernels {
            return Ok(Linear::Ours(QuantMatrix::from_qtensor(&t)?));
        }
        let t = check_candle_kernel_layout(name, t)?;
        Ok(Linear::Candle(QMatMul::from_qtensor(t)?))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        match self {
            Linear::Ours(m) => m.forward(x),
            Linear::Candle(m) => Ok(m.forward(x)?),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Use candle's matmul kernels everywhere instead of ours. Slower in a
    /// portable build; it isolates the forward pass from kernel rounding when
    /// comparing with candle's reference model.
    pub candle_kernels: bool,
}

/// One sequence's share of a forward step.
pub struct SeqStep<'a> {
    /// Tokens to append (a prefill chunk, or one decode token). Not empty.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    embedding: Tensor,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Linear,
    /// RoPE tables `[context_length, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// Per-token tie-break keys derived from the output-head rows; see
    /// [`LlamaModel::tie_keys`].
    tie_keys: Vec<u64>,
    device: Device,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl LlamaModel {
    /// Loads a (plaintext or EE-transformed) GGUF model onto the CPU.
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Self, Error> {
        let open = || {
            File::open(path).map_err(|e| Error::Model(format!("opening {}: {e}", path.display())))
        };
        let header = GgufHeader::read(&mut BufReader::new(open()?))?;
        let config = LlamaConfig::from_gguf(&header)?;
        let mut reader = BufReader::new(open()?);
        let content = gguf_file::Content::read(&mut reader)?;
        let device = Device::Cpu;
        let mut tensor = |name: &str| -> Result<QTensor, Error> {
            content
                .tensor(&mut reader, name, &device)
                .map_err(|e| Error::Model(format!("loading tensor {name}: {e}")))
        };
        let token_embd = tensor("token_embd.weight")?;
        let output_q = match content.tensor_infos.contains_key("output.weight") {
            true => tensor("output.weight")?,
            false => tensor("token_embd.weight")?,
        };
        let tie_keys = {
            let data = output_q.data()?;
            let rows = output_q.shape().dims()[0];
            if rows != config.vocab_size || data.len() % rows != 0 {
                return Err(Error::Model(format!(
                    "output head has {rows} rows, vocabulary {}",
                    config.vocab_size
                )));
            }
            data.chunks_exact(data.len() / rows).map(fnv1a).collect()
        };
        let embedding = token_embd.dequantize(&device)?;
        let rope_freqs = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(
                tensor("rope_freqs.weight")?
                    .dequantize(&device)?
                    .to_vec1::<f32>()?,
            ),
            false => None,
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let mut qmm = |n: &str| -> Result<Linear, Error> {
                let name = format!("blk.{i}.{n}.weight");
                Linear::new(&name, tensor(&name)?, opts)
            };
            let (wq, wk, wv, wo) = (
                qmm("attn_q")?,
                qmm("attn_k")?,
                qmm("attn_v")?,
                qmm("attn_output")?,
            );
            let (w_gate, w_up, w_down) = (qmm("ffn_gate")?, qmm("ffn_up")?, qmm("ffn_down")?);
            let attn_norm = tensor(&format!("blk.{i}.attn_norm.weight"))?.dequantize(&device)?;
            let ffn_norm = tensor(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(&device)?;
            layers.push(Layer {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
            });
        }
        let output_norm = tensor("output_norm.weight")?.dequantize(&device)?;
        let (cos, sin) = rope_tables(&config, rope_freqs.as_deref(), &device)?;
        Ok(Self {
            config,
            embedding,
            layers,
            output_norm,
            output: Linear::new("output", output_q, opts)?,
            cos,
            sin,
            tie_keys,
            device,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    pub fn context_length(&self) -> usize {
        self.config.context_length
    }

    /// A fresh, empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layers, self.config.context_length)
    }

    /// A key per token ID that the vocabulary permutation carries along with
    /// the token (it hashes the token's output-head row, which moves with
    /// it). Samplers break exact logit ties with it, so tie-breaking gives the
    /// same plaintext token on the encrypted and the plaintext model.
    pub fn tie_keys(&self) -> &[u64] {
        &self.tie_keys
    }

    /// Advances every sequence in `batch` by its tokens and returns the
    /// logits after each sequence's last token: `[batch.len(), vocab]`.
    pub fn forward(&self, batch: &mut [SeqStep<'_>]) -> Result<Tensor, Error> {
        compute_pool().install(|| {
            let (hidden, last_rows) = self.forward_hidden(batch)?;
            let last = hidden.index_select(&Tensor::new(last_rows.as_slice(), &self.device)?, 0)?;
            self.logits(&last)
        })
    }

    /// [`forward`](Self::forward) for one sequence: the logits after its
    /// last token, `[vocab]`.
    pub fn forward_one(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>, Error> {
        let logits = self.forward(&mut [SeqStep { tokens, cache }])?;
        Ok(logits.squeeze(0)?.to_vec1()?)
    }

    /// Like [`forward`](Self::forward) for one sequence, but returns the
    /// logits at every new position: `[tokens.len(), vocab]`.
    pub fn forward_all_positions(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor, Error> {
        compute_pool().install(|| {
            let (hidden, _) = self.forward_hidden(&mut [SeqStep { tokens, cache }])?;
            self.logits(&hidden)
        })
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor, Error> {
        let normed =
            candle_nn::ops::rms_norm(hidden, &self.output_norm, self.config.rms_eps as f32)?;
        self.output.forward(&normed)
    }

    /// Runs every layer; returns the final hidden states of all new tokens
    /// `[total_tokens, n_embd]` and the row of each sequence's last token.
    fn forward_hidden(&self, batch: &mut [SeqStep<'_>]) -> Result<(Tensor, Vec<u32>), Error> {
        let mut ids = Vec::new();
        let mut last_rows = Vec::with_capacity(batch.len());
        for step in batch.iter() {
            if step.tokens.is_empty() {
                return Err(Error::Model("a sequence step has no tokens".into()));
            }
            let needed = step.cache.len() + step.tokens.len();
            if needed > self.config.context_length {
                return Err(Error::ContextOverflow {
                    needed,
                    limit: self.config.context_length,
                });
            }
            if let Some(&bad) = step
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(Error::TokenOutOfRange {
                    token: bad,
                    vocab_size: self.config.vocab_size,
                });
            }
            ids.extend_from_slice(step.tokens);
            last_rows.push(ids.len() as u32 - 1);
        }
        let mut x = self
            .embedding
            .index_select(&Tensor::new(ids.as_slice(), &self.device)?, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.config.rms_eps as f32)?;
            let attn = self.attention(li, layer, &h, batch)?;
            x = (x + layer.wo.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.config.rms_eps as f32)?;
            let gated =
                (candle_nn::ops::silu(&layer.w_gate.forward(&h)?)? * layer.w_up.forward(&h)?)?;
            x = (x + layer.w_down.forward(&gated)?)?;
        }
        for step in batch.iter_mut() {
            step.cache.advance(step.tokens.len());
        }
        Ok((x, last_rows))
    }

    /// Self-attention of one layer, per sequence, over stacked rows `h`.
    fn attention(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        batch: &mut [SeqStep<'_>],
    ) -> Result<Tensor, Error> {
        let c = &self.config;
        let (q, k, v) = (
            layer.wq.forward(h)?,
            layer.wk.forward(h)?,
            layer.wv.forward(h)?,
        );
        let group = c.n_head / c.n_kv_head;
        // Sequences attend independently, so they run in parallel.
        let mut first_rows = Vec::with_capacity(batch.len());
        let mut row = 0;
        for step in batch.iter() {
            first_rows.push(row);
            row += step.tokens.len();
        }
        let outputs = batch
            .par_iter_mut()
            .zip(first_rows)
            .map(|(step, row)| -> Result<Tensor, Error> {
                let n = step.tokens.len();
                let pos = step.cache.len();
                let heads = |t: &Tensor, n_heads: usize| -> Result<Tensor, Error> {
                    Ok(t.narrow(0, row, n)?
                        .reshape((n, n_heads, c.head_dim))?
                        .transpose(0, 1)?
                        .contiguous()?)
                };
                let cos = self.cos.narrow(0, pos, n)?;
                let sin = self.sin.narrow(0, pos, n)?;
                // GGUF llama stores q/k rows so that RoPE pairs are interleaved.
                let rope = |t: Tensor| -> Result<Tensor, Error> {
                    Ok(candle_nn::rotary_emb::rope_i(&t.unsqueeze(0)?, &cos, &sin)?.squeeze(0)?)
                };
                let q_s = rope(heads(&q, c.n_head)?)?;
                let k_s = rope(heads(&k, c.n_kv_head)?)?;
                let v_s = heads(&v, c.n_kv_head)?;
                let (k_all, v_all) = step.cache.append(li, &k_s, &v_s)?;
                let total = pos + n;
                if n == 1 {
                    return self.decode_attention(&q_s, &k_all, &v_all);
                }
                // Each q-head reads kv-head `h / group` (GQA): repeat K/V per q-head.
                let rep = |t: &Tensor| -> Result<Tensor, Error> {
                    Ok(t.unsqueeze(1)?
                        .expand((c.n_kv_head, group, total, c.head_dim))?
                        .reshape((c.n_head, total, c.head_dim))?)
                };
                let scale = 1.0 / (c.head_dim as f64).sqrt();
                let mut scores = (q_s.matmul(&rep(&k_all)?.t()?)? * scale)?;
                if let Some(mask) = self.attention_mask(n, pos, total)? {
                    scores = scores.broadcast_add(&mask)?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let out = probs.matmul(&rep(&v_all)?)?;
                Ok(out.transpose(0, 1)?.reshape((n, c.n_head * c.head_dim))?)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// Attention of one new token over its cache, read in place: a decode
    /// step costs a dot product per cached key instead of copying the cache
    /// for every q-head. `q` is `[n_head, 1, hd]`; `k`, `v` are cache views
    /// `[n_kv, total, hd]` (rows contiguous, heads `stride[0]` apart).
    fn decode_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, Error> {
        let c = &self.config;
        let (hd, group) = (c.head_dim, c.n_head / c.n_kv_head);
        let total = k.dim(1)?;
        let first = c.sliding_window.map_or(0, |w| total.saturating_sub(w));
        let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
        let scale = 1.0 / (hd as f32).sqrt();
        let (k_store, k_layout) = k.storage_and_layout();
        let (v_store, v_layout) = v.storage_and_layout();
        let (candle_core::Storage::Cpu(k_cpu), candle_core::Storage::Cpu(v_cpu)) =
            (&*k_store, &*v_store)
        else {
            return Err(Error::Model("decode attention runs on the CPU".into()));
        };
        let (k_data, v_data) = (k_cpu.as_slice::<f32>()?, v_cpu.as_slice::<f32>()?);
        let (k_stride, v_stride) = (k_layout.stride(), v_layout.stride());
        if k_stride[1] != hd || k_stride[2] != 1 || v_stride[1] != hd || v_stride[2] != 1 {
            return Err(Error::Model("unexpected KV cache layout".into()));
        }
        let mut out = vec![0f32; c.n_head * hd];
        attend(
            &OneTokenAttention {
                q: &q,
                keys: &k_data[k_layout.start_offset()..],
                values: &v_data[v_layout.start_offset()..],
                k_head_stride: k_stride[0],
                v_head_stride: v_stride[0],
                head_dim: hd,
                group,
                positions: first..total,
                scale,
            },
            &mut out,
        );
        Ok(Tensor::from_vec(out, (1, c.n_head * hd), &self.device)?)
    }

    /// Additive mask `[n, total]` for `n` new tokens at `pos`: causal,
    /// plus the sliding window when the model has one. `None` when nothing
    /// is masked (a decode step within the window).
    fn attention_mask(&self, n: usize, pos: usize, total: usize) -> Result<Option<Tensor>, Error> {
        let window = self.config.sliding_window;
        if n == 1 && window.is_none_or(|w| total <= w) {
            return Ok(None);
        }
        let mut mask = vec![0f32; n * total];
        for (i, row) in mask.chunks_exact_mut(total).enumerate() {
            let query_pos = pos + i;
            for (key_pos, m) in row.iter_mut().enumerate() {
                let future = key_pos > query_pos;
                let too_old = window.is_some_and(|w| query_pos.saturating_sub(key_pos) >= w);
                if future || too_old {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        Ok(Some(Tensor::from_vec(mask, (n, total), &self.device)?))
    }
}

/// One new token's attention over cached keys and values, per q-head.
struct OneTokenAttention<'a> {
    /// `[n_head * head_dim]`.
    q: &'a [f32],
    /// Cache storage from the layer's first key/value: rows of `head_dim`,
    /// kv-heads `*_head_stride` apart.
    keys: &'a [f32],
    values: &'a [f32],
    k_head_stride: usize,
    v_head_stride: usize,
    head_dim: usize,
    /// q-heads per kv-head.
    group: usize,
    /// Cached positions attended to.
    positions: std::ops::Range<usize>,
    scale: f32,
}

/// Runs [`attend_portable`], as an AVX2 build when the CPU has it: the same
/// operations in the same order, so the same bits, in wider registers.
fn attend(a: &OneTokenAttention<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: the CPU reports AVX2 and FMA.
        return unsafe { attend_avx2(a, out) };
    }
    attend_portable(a, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(a: &OneTokenAttention<'_>, out: &mut [f32]) {
    attend_portable(a, out)
}

/// Softmax-weighted sum of values for each q-head; `out` is `[n_head * hd]`.
#[inline(always)]
fn attend_portable(a: &OneTokenAttention<'_>, out: &mut [f32]) {
    let hd = a.head_dim;
    let mut scores = vec![0f32; a.positions.len()];
    for (h, (qh, oh)) in
        a.q.chunks_exact(hd)
            .zip(out.chunks_exact_mut(hd))
            .enumerate()
    {
        let keys = &a.keys[(h / a.group) * a.k_head_stride..];
        let values = &a.values[(h / a.group) * a.v_head_stride..];
        let mut max = f32::NEG_INFINITY;
        for (s, score) in a.positions.clone().zip(scores.iter_mut()) {
            *score = dot(qh, &keys[s * hd..][..hd]) * a.scale;
            max = max.max(*score);
        }
        let mut sum = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            sum += *score;
        }
        for (s, p) in a.positions.clone().zip(&scores) {
            let w = p / sum;
            for (o, x) in oh.iter_mut().zip(&values[s * hd..][..hd]) {
                *o += w * x;
            }
        }
    }
}

/// A dot product in eight independent lanes, which the compiler vectorizes
/// (a plain iterator sum must keep its sequential float order, and does not).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
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

/// candle's Q4_1/Q5_0/Q5_1 dot products process blocks in pairs and panic
/// (poisoning the thread pool) on an odd count; refuse such a matrix at load
/// when candle's kernels would run it (ours take any count).
fn check_candle_kernel_layout(name: &str, t: QTensor) -> Result<QTensor, Error> {
    if matches!(
        t.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    ) {
        let row = t.shape().dims().last().copied().unwrap_or(0);
        if !(row / t.dtype().block_size()).is_multiple_of(2) {
            return Err(Error::Unsupported(format!(
                "{name}: {:?} rows of {row} values (an odd number of blocks)",
                t.dtype()
            )));
        }
    }
    Ok(t)
}

/// cos/sin tables for every position up to the context length.
fn rope_tables(
    c: &LlamaConfig,
    freq_factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Tensor, Tensor), Error> {
    let half = c.head_dim / 2;
    if freq_factors.is_some_and(|f| f.len() != half) {
        return Err(Error::Model(
            "rope_freqs.weight has the wrong length".into(),
        ));
    }
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let f = 1.0 / c.rope_freq_base.powf((2 * i) as f32 / c.head_dim as f32);
            f / freq_factors.map_or(1.0, |ff| ff[i])
        })
        .collect();
    let positions = Tensor::arange(0u32, c.context_length as u32, device)?.to_dtype(DType::F32)?;
    let positions = (positions / f64::from(c.rope_linear_scale))?;
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let angles = positions
        .reshape((c.context_length, 1))?
        .matmul(&inv_freq)?;
    Ok((angles.cos()?.contiguous()?, angles.sin()?.contiguous()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ee_core::gguf::GgufHeader;

    #[test]
    fn rope_tables_cover_the_whole_context_not_just_4096() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let spec = crate::testing::TinySpec {
            context_length: 8192,
            ..crate::testing::TinySpec::llama_q4_1()
        };
        crate::testing::write_tiny_model(&path, &spec).unwrap();
        let header =
            GgufHeader::read(&mut std::io::BufReader::new(File::open(&path).unwrap())).unwrap();
        let config = LlamaConfig::from_gguf(&header).unwrap();
        let (cos, sin) = rope_tables(&config, None, &Device::Cpu).unwrap();
        assert_eq!(cos.dims(), &[8192, config.head_dim / 2]);
        let (c, s): (Vec<f32>, Vec<f32>) = (
            cos.get(8191).unwrap().to_vec1().unwrap(),
            sin.get(8191).unwrap().to_vec1().unwrap(),
        );
        assert!((c[0] - 8191f32.cos()).abs() < 1e-3 && (s[0] - 8191f32.sin()).abs() < 1e-3);
        let scaled = LlamaConfig {
            rope_linear_scale: 2.0,
            ..config.clone()
        };
        let (half_cos, _) = rope_tables(&scaled, None, &Device::Cpu).unwrap();
        let want: Vec<f32> = cos.get(4000).unwrap().to_vec1().unwrap();
        let got: Vec<f32> = half_cos.get(8000).unwrap().to_vec1().unwrap();
        assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-4));
    }
}
