//! Tensor names: GGUF's (llama.cpp's) and Hugging Face's for the same
//! Llama-family weights, as llama.cpp's `convert_hf_to_gguf.py` maps them.
//!
//! The engine's architectures ask for weights by their Hugging Face names;
//! a GGUF weight source translates with [`gguf_name`].

/// Tensors whose rows are indexed by token ID: the token embedding and the
/// output head (absent when tied to the embedding).
pub const VOCAB_ROW_TENSORS: [&str; 2] = ["token_embd.weight", "output.weight"];

/// Whole-model tensors: (Hugging Face, GGUF).
const GLOBAL: [(&str, &str); 3] = [
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
];

/// Per-layer tensors, after `model.layers.{i}.` and `blk.{i}.`.
const LAYER: [(&str, &str); 9] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// The GGUF name of a Hugging Face Llama/Mistral tensor name, or `None`
/// for a name llama.cpp does not use.
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some(&(_, g)) = GLOBAL.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_owned());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, g) = LAYER.iter().find(|(h, _)| *h == tail)?;
    Some(format!("blk.{layer}.{g}"))
}

/// The Hugging Face name of a GGUF Llama/Mistral tensor name, or `None` for
/// a GGUF-only tensor such as `rope_freqs.weight`.
pub fn hf_name(gguf: &str) -> Option<String> {
    if let Some(&(h, _)) = GLOBAL.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (h, _) = LAYER.iter().find(|(_, g)| *g == tail)?;
    Some(format!("model.layers.{layer}.{h}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_map_to_none() {
        for hf in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(hf_name(&g).as_deref(), Some(hf), "{hf} -> {g}");
        }
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").as_deref(),
            Some("blk.3.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some(VOCAB_ROW_TENSORS[0])
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some(VOCAB_ROW_TENSORS[1])
        );
        for bad in [
            "model.layers.x.mlp.up_proj.weight",
            "model.layers.1.mlp.bias",
            "foo",
        ] {
            assert_eq!(gguf_name(bad), None, "{bad}");
        }
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
