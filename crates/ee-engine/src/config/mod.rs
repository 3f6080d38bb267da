//! Hyper-parameters. Llama/Mistral's, one module per source: GGUF metadata
//! (`gguf.rs`) and Hugging Face's `config.json` (`hf.rs`); BERT-family
//! encoders' from `config.json` (`encoder.rs`).

pub mod encoder;
mod gguf;
mod hf;

/// The hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_freq_base: f32,
    /// Linear RoPE scaling: positions are divided by this factor.
    pub rope_linear_scale: f32,
    /// Per-frequency divisors of RoPE's inverse frequencies, `[head_dim / 2]`
    /// (Llama 3's long-context scaling): GGUF's `rope_freqs.weight`, or
    /// computed from `rope_scaling` in `config.json`.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// Mistral-style sliding-window attention, in tokens.
    pub sliding_window: Option<usize>,
    /// Whether the output head is the token embedding: `Some` when the
    /// config says (`tie_word_embeddings`), `None` when only the weights do
    /// (GGUF: tied unless there is an `output.weight`).
    pub tie_word_embeddings: Option<bool>,
}

impl LlamaConfig {
    /// Bytes of KV cache of `dtype` one position takes, over all layers.
    pub fn kv_bytes_per_token(&self, dtype: crate::KvCacheDtype) -> usize {
        self.n_layers * self.n_kv_head * self.head_dim * 2 * dtype.size()
    }

    /// Multiply-adds in the weight matrices of the layers for one token:
    /// the attention projections and the gated FFN (not the output head,
    /// which only a sequence's last token runs).
    pub fn layer_macs_per_token(&self) -> usize {
        let (e, q, kv) = (
            self.n_embd,
            self.n_head * self.head_dim,
            self.n_kv_head * self.head_dim,
        );
        self.n_layers * (e * (q + 2 * kv) + q * e + 3 * e * self.n_ff)
    }

    /// Multiply-adds of attention, for one query, per cached position it
    /// attends to: `q·k` and the weighted sum of `v`, in every head and layer.
    pub fn attention_macs_per_position(&self) -> usize {
        2 * self.n_layers * self.n_head * self.head_dim
    }
}
