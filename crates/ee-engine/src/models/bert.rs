//! BERT (`BertModel`, `BertForSequenceClassification`), as transformers'
//! `modeling_bert.py` and candle-transformers' `bert.rs` define it, and the
//! post-LayerNorm encoder blocks that DistilBERT (`distilbert.rs`) shares
//! under other tensor names.
//!
//! - embeddings: `LayerNorm(word[t] + position[i] + token_type[0])`;
//! - each layer: `x = LN(x + Attn(x)·Woᵀ)`, `x = LN(x + act(x·Wupᵀ)·Wdownᵀ)`,
//!   every projection with a bias, attention bidirectional over the
//!   sequence's own tokens;
//! - the classification head reads the first (`[CLS]`) token's state.
//!
//! Float weights of any stored type are widened to f32 once, at load, and
//! the matmuls run in candle's f32 GEMM.

use candle_core::{DType, Device, Tensor};

use crate::config::encoder::{Activation, EncoderConfig};
use crate::encoder::{stack_batch, Encoder, Pooling};
use crate::weights::WeightSource;
use crate::Error;

/// A projection with a bias: `y = x·Wᵀ + b`, `W: [out, in]`.
pub(crate) struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    pub(crate) fn load(
        src: &dyn WeightSource,
        prefix: &str,
        out: usize,
        input: usize,
    ) -> Result<Self, Error> {
        Ok(Self {
            weight: f32_tensor(src, &format!("{prefix}.weight"), &[out, input])?,
            bias: f32_tensor(src, &format!("{prefix}.bias"), &[out])?,
        })
    }

    /// `[n, in]` → `[n, out]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }
}

/// LayerNorm over the last dimension, with weight and bias.
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub(crate) fn load(
        src: &dyn WeightSource,
        prefix: &str,
        width: usize,
        eps: f64,
    ) -> Result<Self, Error> {
        Ok(Self {
            weight: f32_tensor(src, &format!("{prefix}.weight"), &[width])?,
            bias: f32_tensor(src, &format!("{prefix}.bias"), &[width])?,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, Error> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

fn f32_tensor(src: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Tensor, Error> {
    src.tensor(name)?.expect_shape(shape)?.to_f32()
}

/// Tensor names of one encoder layer, relative to its prefix.
pub(crate) struct LayerNames {
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attn_out: &'static str,
    pub attn_norm: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    pub out_norm: &'static str,
}

const BERT_LAYER: LayerNames = LayerNames {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    up: "intermediate.dense",
    down: "output.dense",
    out_norm: "output.LayerNorm",
};

/// A post-LayerNorm transformer block with biased projections.
pub(crate) struct EncoderLayer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    up: Dense,
    down: Dense,
    out_norm: LayerNorm,
    n_heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    pub(crate) fn load(
        src: &dyn WeightSource,
        prefix: &str,
        names: &LayerNames,
        c: &EncoderConfig,
    ) -> Result<Self, Error> {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let dense =
            |name: &str, out, input| Dense::load(src, &format!("{prefix}.{name}"), out, input);
        let norm =
            |name: &str| LayerNorm::load(src, &format!("{prefix}.{name}"), d, c.layer_norm_eps);
        Ok(Self {
            query: dense(names.query, d, d)?,
            key: dense(names.key, d, d)?,
            value: dense(names.value, d, d)?,
            attn_out: dense(names.attn_out, d, d)?,
            attn_norm: norm(names.attn_norm)?,
            up: dense(names.up, f, d)?,
            down: dense(names.down, d, f)?,
            out_norm: norm(names.out_norm)?,
            n_heads: c.n_heads,
            activation: c.activation,
        })
    }

    /// `x`: the packed states `[Σ len, hidden]` of sequences of `lens`.
    pub(crate) fn forward(&self, x: &Tensor, lens: &[usize]) -> Result<Tensor, Error> {
        let (q, k, v) = (
            self.query.forward(x)?,
            self.key.forward(x)?,
            self.value.forward(x)?,
        );
        let context = self.attention(&q, &k, &v, lens)?;
        let x = self
            .attn_norm
            .forward(&(x + self.attn_out.forward(&context)?)?)?;
        let up = self.up.forward(&x)?;
        let up = match self.activation {
            Activation::Gelu => up.gelu_erf()?,
            Activation::GeluTanh => up.gelu()?,
            Activation::Relu => up.relu()?,
        };
        self.out_norm.forward(&(&x + self.down.forward(&up)?)?)
    }

    /// Bidirectional attention of each sequence over its own tokens:
    /// `softmax(q·kᵀ/√hd)·v` per head.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
    ) -> Result<Tensor, Error> {
        let width = q.dim(1)?;
        let head_dim = width / self.n_heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut out = Vec::with_capacity(lens.len());
        let mut start = 0;
        for &len in lens {
            let heads = |t: &Tensor| -> Result<Tensor, Error> {
                Ok(t.narrow(0, start, len)?
                    .reshape((len, self.n_heads, head_dim))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
            let scores = (q.matmul(&k.t()?)? * scale)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            out.push(probs.matmul(&v)?.transpose(0, 1)?.reshape((len, width))?);
            start += len;
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}

/// Token, position and (BERT) token-type embeddings, summed and normalised.
pub(crate) struct Embeddings {
    word: Tensor,
    position: Tensor,
    /// Row 0 of `token_type_embeddings`: every input is one segment.
    token_type: Option<Tensor>,
    norm: LayerNorm,
}

impl Embeddings {
    pub(crate) fn load(
        src: &dyn WeightSource,
        prefix: &str,
        c: &EncoderConfig,
    ) -> Result<Self, Error> {
        let d = c.hidden_size;
        let token_type = match c.type_vocab_size {
            0 => None,
            n => Some(
                f32_tensor(
                    src,
                    &format!("{prefix}.token_type_embeddings.weight"),
                    &[n, d],
                )?
                .get(0)?,
            ),
        };
        Ok(Self {
            word: f32_tensor(
                src,
                &format!("{prefix}.word_embeddings.weight"),
                &[c.vocab_size, d],
            )?,
            position: f32_tensor(
                src,
                &format!("{prefix}.position_embeddings.weight"),
                &[c.max_positions, d],
            )?,
            token_type,
            norm: LayerNorm::load(src, &format!("{prefix}.LayerNorm"), d, c.layer_norm_eps)?,
        })
    }

    fn forward(&self, ids: &[u32], positions: &[u32]) -> Result<Tensor, Error> {
        let index = |v: &[u32]| Tensor::new(v, &Device::Cpu);
        let mut x = (self.word.index_select(&index(ids)?, 0)?
            + self.position.index_select(&index(positions)?, 0)?)?;
        if let Some(t) = &self.token_type {
            x = x.broadcast_add(t)?;
        }
        self.norm.forward(&x)
    }
}

/// The activation between a classification head's two projections.
#[derive(Clone, Copy)]
pub(crate) enum HeadActivation {
    /// BERT's pooler.
    Tanh,
    /// DistilBERT's `pre_classifier`.
    Relu,
}

/// `classifier(act(dense(h_cls)))`.
pub(crate) struct ClassifierHead {
    pub dense: Dense,
    pub activation: HeadActivation,
    pub classifier: Dense,
}

impl ClassifierHead {
    fn forward(&self, first_states: &Tensor) -> Result<Tensor, Error> {
        let h = self.dense.forward(first_states)?;
        let h = match self.activation {
            HeadActivation::Tanh => h.tanh()?,
            HeadActivation::Relu => h.relu()?,
        };
        self.classifier.forward(&h)
    }
}

/// A BERT-family encoder: embeddings, post-LN layers, an optional head.
pub struct EncoderModel {
    pub(crate) config: EncoderConfig,
    pub(crate) embeddings: Embeddings,
    pub(crate) layers: Vec<EncoderLayer>,
    pub(crate) head: Option<ClassifierHead>,
}

/// Where an encoder family keeps its tensors.
pub(crate) struct Naming {
    /// The prefix of a classifier's encoder tensors (`bert.`), absent when
    /// the bare model was saved alone; the head sits at the root.
    pub prefix: &'static str,
    /// Layer `l` is `{prefix}{layers}.{l}`.
    pub layers: &'static str,
    pub layer: LayerNames,
    /// The head's first projection, and what follows it.
    pub head_dense: &'static str,
    pub head_activation: HeadActivation,
}

const BERT: Naming = Naming {
    prefix: "bert.",
    layers: "encoder.layer",
    layer: BERT_LAYER,
    head_dense: "bert.pooler.dense",
    head_activation: HeadActivation::Tanh,
};

impl EncoderModel {
    /// Loads the encoder `config` describes from `src`, named as `naming`
    /// says.
    pub(crate) fn load(
        config: EncoderConfig,
        src: &dyn WeightSource,
        naming: &Naming,
    ) -> Result<Self, Error> {
        let p = match src.contains(&format!(
            "{}embeddings.word_embeddings.weight",
            naming.prefix
        )) {
            true => naming.prefix,
            false => "",
        };
        let d = config.hidden_size;
        let layers = (0..config.n_layers)
            .map(|l| {
                let prefix = format!("{p}{}.{l}", naming.layers);
                EncoderLayer::load(src, &prefix, &naming.layer, &config)
            })
            .collect::<Result<_, _>>()?;
        let head = match config.num_labels {
            Some(labels) => Some(ClassifierHead {
                dense: Dense::load(src, naming.head_dense, d, d)?,
                activation: naming.head_activation,
                classifier: Dense::load(src, "classifier", labels, d)?,
            }),
            None => None,
        };
        Ok(Self {
            embeddings: Embeddings::load(src, &format!("{p}embeddings"), &config)?,
            layers,
            head,
            config,
        })
    }
}

/// Loads BERT. A classifier's tensors sit under `bert.` (with `classifier`
/// at the root); a bare `BertModel` saved alone has none.
pub fn load(config: EncoderConfig, src: &dyn WeightSource) -> Result<EncoderModel, Error> {
    EncoderModel::load(config, src, &BERT)
}

impl Encoder for EncoderModel {
    fn architecture(&self) -> &str {
        &self.config.architecture
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn max_positions(&self) -> usize {
        self.config.max_positions
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn num_labels(&self) -> Option<usize> {
        self.config.num_labels
    }

    fn pooling(&self) -> Pooling {
        self.config.pooling
    }

    fn hidden_states(&self, batch: &[&[u32]]) -> Result<Tensor, Error> {
        let (ids, positions) = stack_batch(batch, self.vocab_size(), self.max_positions())?;
        let lens: Vec<usize> = batch.iter().map(|s| s.len()).collect();
        let mut x = self.embeddings.forward(&ids, &positions)?;
        for layer in &self.layers {
            x = layer.forward(&x, &lens)?;
        }
        Ok(x)
    }

    fn classifier_logits(&self, states: &Tensor, lens: &[usize]) -> Result<Tensor, Error> {
        let head = self
            .head
            .as_ref()
            .ok_or_else(|| Error::Unsupported("this encoder has no classification head".into()))?;
        let mut first = Vec::with_capacity(lens.len());
        let mut start = 0u32;
        for &len in lens {
            first.push(start);
            start += len as u32;
        }
        let first = states.index_select(&Tensor::new(first, &Device::Cpu)?, 0)?;
        head.forward(&first.to_dtype(DType::F32)?)
    }
}
