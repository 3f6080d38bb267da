//! The hidden tier of a Llama/Mistral checkpoint (Hugging Face names): on
//! top of the vocabulary permutation, the residual channels (σ), each
//! layer's FFN channels (τₗ) and attention heads (ηₗ, by key/value head,
//! query heads following their group) move, as `../shared/docs/ee-design.md`
//! lays out. RMSNorm is invariant under a channel permutation, SiLU and
//! the gate product act per channel, and RoPE pairs stay within their
//! head, so the model computes the same function; only float sums run in
//! another order.

use super::channels::Axis;
use crate::gguf::names::hf_name;

/// The axes of the Llama/Mistral tensor `name`, or `None` for a tensor
/// that is not one (`q_group` is query heads per key/value head).
pub fn llama_axes(name: &str, q_group: usize) -> Option<Vec<Axis>> {
    use Axis::*;
    match name {
        "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![Vocab, Residual]),
        "model.norm.weight" => return Some(vec![Residual]),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let l: usize = layer.parse().ok()?;
    let (q, kv) = (
        Heads {
            layer: l,
            group: q_group,
        },
        Heads { layer: l, group: 1 },
    );
    Some(match part {
        // RoPE's inverse frequencies, which some checkpoints save: a buffer
        // of per-pair constants, untouched (pairs never leave their head).
        "self_attn.rotary_emb.inv_freq" => vec![],
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![Residual],
        "self_attn.q_proj.weight" => vec![q, Residual],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, Residual],
        "self_attn.o_proj.weight" => vec![Residual, q],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![Ffn(l), Residual],
        "mlp.down_proj.weight" => vec![Residual, Ffn(l)],
        _ => return None,
    })
}

/// The axes of the GGUF Llama/Mistral tensor `name` (llama.cpp's names),
/// as [`llama_axes`] gives them for its Hugging Face name; `None` for a
/// tensor that is not one. RoPE's frequency factors (`rope_freqs.weight`,
/// one per pair within a head) stay where they are.
pub fn gguf_llama_axes(name: &str, q_group: usize) -> Option<Vec<Axis>> {
    match name {
        "rope_freqs.weight" => Some(vec![]),
        _ => llama_axes(&hf_name(name)?, q_group),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_have_their_hugging_face_twins_axes() {
        let q = Axis::Heads { layer: 3, group: 2 };
        assert_eq!(
            gguf_llama_axes("blk.3.attn_output.weight", 2),
            Some(vec![Axis::Residual, q])
        );
        assert_eq!(
            gguf_llama_axes("token_embd.weight", 2),
            Some(vec![Axis::Vocab, Axis::Residual])
        );
        assert_eq!(gguf_llama_axes("rope_freqs.weight", 2), Some(vec![]));
        assert_eq!(gguf_llama_axes("blk.3.attn_q.bias", 2), None);
    }

    #[test]
    fn every_llama_tensor_has_its_axes_and_others_none() {
        use Axis::*;
        let q = Heads { layer: 2, group: 3 };
        let kv = Heads { layer: 2, group: 1 };
        for (name, expected) in [
            ("model.embed_tokens.weight", vec![Vocab, Residual]),
            ("lm_head.weight", vec![Vocab, Residual]),
            ("model.norm.weight", vec![Residual]),
            ("model.layers.2.input_layernorm.weight", vec![Residual]),
            ("model.layers.2.self_attn.q_proj.weight", vec![q, Residual]),
            (
                "model.layers.2.post_attention_layernorm.weight",
                vec![Residual],
            ),
            ("model.layers.2.self_attn.k_proj.weight", vec![kv, Residual]),
            ("model.layers.2.self_attn.v_proj.weight", vec![kv, Residual]),
            ("model.layers.2.self_attn.rotary_emb.inv_freq", vec![]),
            (
                "model.layers.2.mlp.gate_proj.weight",
                vec![Ffn(2), Residual],
            ),
            ("model.layers.2.self_attn.o_proj.weight", vec![Residual, q]),
            ("model.layers.2.mlp.up_proj.weight", vec![Ffn(2), Residual]),
            (
                "model.layers.2.mlp.down_proj.weight",
                vec![Residual, Ffn(2)],
            ),
        ] {
            assert_eq!(llama_axes(name, 3), Some(expected), "{name}");
        }
        for other in [
            "model.layers.2.self_attn.q_proj.bias",
            "model.layers.x.mlp.up_proj.weight",
            "rotary.inv_freq",
        ] {
            assert_eq!(llama_axes(other, 3), None, "{other}");
        }
    }
}
