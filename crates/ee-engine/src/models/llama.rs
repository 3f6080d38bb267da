//! The Llama architecture (`LlamaForCausalLM`), and Mistral
//! (`MistralForCausalLM`), which is Llama with sliding-window attention:
//! a plain forward pass over any [`WeightSource`], built for continuous
//! batching.
//!
//! One [`CausalLm::forward`] call advances any number of sequences, each
//! with its own KV cache and position, by any number of tokens each (a
//! prefill chunk or a single decode token). Token rows of all sequences are
//! stacked for the weight matmuls; only attention runs per sequence, one
//! sequence per rayon task. Every matmul computes each activation row
//! independently, so a sequence's logits do not depend on what else is in
//! the batch.
//!
//! The model is agnostic to EE: an encrypted artifact is loaded and run
//! exactly like a plaintext one.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::activation::swiglu;
use crate::attention::{attention, reference_attention};
use crate::config::LlamaConfig;
use crate::embedding::Embedding;
use crate::kv_cache::{KvCache, KvCacheDtype};
use crate::linear::{Linear, LoadOptions, Stacked};
use crate::model::{compute_pool, stack_steps, CausalLm, SeqStep, StepCost};
use crate::weights::{RopeLayout, StoredTensor, WeightSource};
use crate::Error;

struct Layer {
    attn_norm: Tensor,
    /// q, k and v.
    qkv: Stacked,
    wo: Linear,
    ffn_norm: Tensor,
    /// The FFN's gate and up.
    gate_up: Stacked,
    w_down: Linear,
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    embedding: Embedding,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Linear,
    /// RoPE tables `[context_length, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    rope_layout: RopeLayout,
    /// Per-token tie-break keys; see [`CausalLm::tie_keys`].
    tie_keys: Vec<u64>,
    /// Attention as candle's reference model computes it
    /// ([`LoadOptions::candle_kernels`]).
    reference_attention: bool,
    /// candle's RMSNorm and SiLU ([`LoadOptions::candle_elementwise`]).
    candle_elementwise: bool,
    kv_cache_dtype: KvCacheDtype,
    device: Device,
}

impl CausalLm for LlamaModel {
    fn architecture(&self) -> &str {
        &self.config.architecture
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn context_length(&self) -> usize {
        self.config.context_length
    }

    fn weight_types(&self) -> String {
        let mut seen: Vec<String> = Vec::new();
        let layers = self.layers.iter().flat_map(|l| {
            let mut linears = l.qkv.linears();
            linears.push(&l.wo);
            linears.extend(l.gate_up.linears());
            linears.push(&l.w_down);
            linears
        });
        for format in layers.chain([&self.output]).map(Linear::format) {
            if !seen.contains(&format) {
                seen.push(format);
            }
        }
        seen.join(", ")
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.config.n_layers,
            self.config.context_length,
            self.kv_cache_dtype,
        )
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.config.kv_bytes_per_token(self.kv_cache_dtype)
    }

    fn step_cost(&self) -> StepCost {
        StepCost::llama(&self.config)
    }

    fn tie_keys(&self) -> &[u64] {
        &self.tie_keys
    }

    fn forward(&self, batch: &mut [SeqStep<'_>]) -> Result<Tensor, Error> {
        compute_pool().install(|| {
            let (hidden, last_rows) = self.forward_hidden(batch)?;
            let last = hidden.index_select(&Tensor::new(last_rows.as_slice(), &self.device)?, 0)?;
            self.logits(&last)
        })
    }

    fn forward_all_positions(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor, Error> {
        compute_pool().install(|| {
            let (hidden, _) = self.forward_hidden(&mut [SeqStep { tokens, cache }])?;
            self.logits(&hidden)
        })
    }
}

impl LlamaModel {
    /// Builds the model from `weights`, named as Hugging Face names them.
    pub fn new(
        config: LlamaConfig,
        weights: &dyn WeightSource,
        opts: &LoadOptions,
    ) -> Result<Self, Error> {
        let device = Device::Cpu;
        let c = &config;
        let (d, q, kv) = (c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let tensor = |name: &str, shape: &[usize]| weights.tensor(name)?.expect_shape(shape);
        let embedding = tensor("model.embed_tokens.weight", &[c.vocab_size, d])?;
        let has_head = weights.contains("lm_head.weight");
        let tied = match c.tie_word_embeddings {
            Some(false) if !has_head => {
                return Err(Error::Model(
                    "the config does not tie the output head to the embedding \
                     (tie_word_embeddings is false or absent), but there is no lm_head.weight"
                        .into(),
                ))
            }
            Some(tied) => tied,
            None => !has_head,
        };
        let output = match tied {
            false => tensor("lm_head.weight", &[c.vocab_size, d])?,
            true => tensor("model.embed_tokens.weight", &[c.vocab_size, d])?,
        };
        let tie_keys = output.row_hashes()?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let name = |n: &str| format!("model.layers.{i}.{n}.weight");
            let stored = |n: &str, shape: [usize; 2]| tensor(&name(n), &shape);
            let linear = |n: &str, shape: [usize; 2]| {
                let t = stored(n, shape)?;
                let linear = t.to_linear(opts);
                weights.release(t.bytes);
                linear
            };
            // Stacked, then their mapped pages released.
            let stack = |parts: &[StoredTensor<'_>]| {
                let stacked = StoredTensor::to_stacked(parts, opts);
                parts.iter().for_each(|t| weights.release(t.bytes));
                stacked
            };
            let norm = |n: &str| tensor(&name(n), &[d])?.to_f32();
            let qkv = [
                stored("self_attn.q_proj", [q, d])?,
                stored("self_attn.k_proj", [kv, d])?,
                stored("self_attn.v_proj", [kv, d])?,
            ];
            let gate_up = [
                stored("mlp.gate_proj", [c.n_ff, d])?,
                stored("mlp.up_proj", [c.n_ff, d])?,
            ];
            layers.push(Layer {
                attn_norm: norm("input_layernorm")?,
                qkv: stack(&qkv)?,
                wo: linear("self_attn.o_proj", [d, q])?,
                ffn_norm: norm("post_attention_layernorm")?,
                gate_up: stack(&gate_up)?,
                w_down: linear("mlp.down_proj", [d, c.n_ff])?,
            });
        }
        let output_norm = tensor("model.norm.weight", &[d])?.to_f32()?;
        let (cos, sin) = rope_tables(&config, &device)?;
        let embedding_rows = Embedding::new(&embedding, weights.file_range(embedding.bytes))?;
        let output_linear = output.to_linear(opts)?;
        weights.release(embedding.bytes);
        weights.release(output.bytes);
        Ok(Self {
            embedding: embedding_rows,
            layers,
            output_norm,
            output: output_linear,
            cos,
            sin,
            rope_layout: weights.rope_layout(),
            tie_keys,
            reference_attention: opts.candle_kernels,
            kv_cache_dtype: opts.kv_cache_dtype,
            candle_elementwise: opts.candle_elementwise,
            device,
            config,
        })
    }

    /// RMSNorm: ours, whose sum no channel order changes (the hidden
    /// tier's exactness on GGUF), or candle's.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor, Error> {
        let eps = self.config.rms_eps as f32;
        match self.candle_elementwise {
            true => Ok(candle_nn::ops::rms_norm(x, weight, eps)?),
            false => crate::norm::rms_norm(x, weight, eps),
        }
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor, Error> {
        let normed = self.rms_norm(hidden, &self.output_norm)?;
        self.output.forward(&normed)
    }

    /// Runs every layer; returns the final hidden states of all new tokens
    /// `[total_tokens, n_embd]` and the row of each sequence's last token.
    fn forward_hidden(&self, batch: &mut [SeqStep<'_>]) -> Result<(Tensor, Vec<u32>), Error> {
        let (ids, last_rows) = stack_steps(batch, self.vocab_size(), self.context_length())?;
        let mut x = self.embedding.forward(&ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let attn = self.attention(li, layer, &h, batch)?;
            x = (x + layer.wo.forward(&attn)?)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let [gate, up] = parts(layer.gate_up.forward(&h)?)?;
            let gated = match self.candle_elementwise {
                true => (candle_nn::ops::silu(&gate)? * up)?,
                false => swiglu(&gate, &up)?,
            };
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
        let [q, k, v] = parts(layer.qkv.forward(h)?)?;
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
                let rope = |t: Tensor| -> Result<Tensor, Error> {
                    let t = t.unsqueeze(0)?;
                    let t = match self.rope_layout {
                        RopeLayout::Interleaved => candle_nn::rotary_emb::rope_i(&t, &cos, &sin)?,
                        RopeLayout::HalfSplit => candle_nn::rotary_emb::rope(&t, &cos, &sin)?,
                    };
                    Ok(t.squeeze(0)?)
                };
                let q_s = rope(heads(&q, c.n_head)?)?;
                let k_s = rope(heads(&k, c.n_kv_head)?)?;
                let v_s = heads(&v, c.n_kv_head)?;
                let cached = step.cache.append(li, &k_s, &v_s)?;
                match self.reference_attention {
                    false => attention(&q_s, &cached, c.sliding_window),
                    true => reference_attention(&q_s, &cached, c.sliding_window),
                }
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Tensor::cat(&outputs, 0)?)
    }
}

/// A stacked projection's outputs, as many as it has parts.
fn parts<const N: usize>(outputs: Vec<Tensor>) -> Result<[Tensor; N], Error> {
    outputs
        .try_into()
        .map_err(|_| Error::Model("a stacked projection lost a part".into()))
}

/// cos/sin tables for every position up to the context length.
fn rope_tables(c: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor), Error> {
    let half = c.head_dim / 2;
    let freq_factors = c.rope_freq_factors.as_deref();
    if freq_factors.is_some_and(|f| f.len() != half) {
        return Err(Error::Model(
            "the RoPE frequency factors have the wrong length".into(),
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
    use crate::weights::gguf::GgufWeights;

    #[test]
    fn rope_tables_cover_the_whole_context_not_just_4096() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let spec = crate::testing::TinySpec {
            context_length: 8192,
            ..crate::testing::TinySpec::llama_q4_1()
        };
        crate::testing::write_tiny_model(&path, &spec).unwrap();
        let config = LlamaConfig::from_gguf(&GgufWeights::open(&path).unwrap()).unwrap();
        let (cos, sin) = rope_tables(&config, &Device::Cpu).unwrap();
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
        let (half_cos, _) = rope_tables(&scaled, &Device::Cpu).unwrap();
        let want: Vec<f32> = cos.get(4000).unwrap().to_vec1().unwrap();
        let got: Vec<f32> = half_cos.get(8000).unwrap().to_vec1().unwrap();
        assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-4));
    }
}
