//! Adversary 3: anyone who can query the blind server. It sends one-token
//! prompts of encrypted IDs and reads the top log-probabilities of the
//! answer. The *shape* of the next-token distribution after a token (how
//! sure the model is, how the mass falls off) does not depend on the
//! permutation, so comparing it with the public model's shapes, computed
//! locally for every plaintext token, identifies the queried token: this
//! works against any exact transform of a public model.
//!
//! The fingerprint of a token is the top `k` log-probabilities after it,
//! sorted (what an OpenAI `top_logprobs` answer gives), matched by
//! Euclidean distance.

use candle_core::{DType, Device, Tensor, D};
use ee_engine::{CausalLm, SeqStep};

use crate::{Error, RecoveredMap};

/// The top-`k` log-probabilities of the next token after each of `tokens`
/// alone, sorted descending: `[tokens.len(), k]`, row-major.
///
/// # Errors
/// The model fails, or `k` exceeds its vocabulary.
pub fn fingerprints(model: &dyn CausalLm, tokens: &[u32], k: usize) -> Result<Vec<f32>, Error> {
    if k == 0 || k > model.vocab_size() {
        return Err(Error::Model(format!(
            "top-{k} fingerprints need 1 to {} tokens",
            model.vocab_size()
        )));
    }
    const BATCH: usize = 64;
    let mut out = Vec::with_capacity(tokens.len() * k);
    for chunk in tokens.chunks(BATCH) {
        let mut caches: Vec<_> = chunk.iter().map(|_| model.new_cache()).collect();
        let mut steps: Vec<SeqStep<'_>> = chunk
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| SeqStep {
                tokens: std::slice::from_ref(t),
                cache,
            })
            .collect();
        let logits = model.forward(&mut steps)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let sorted = logp.sort_last_dim(false)?.0.narrow(1, 0, k)?;
        out.extend(sorted.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Maps each queried encrypted ID to the plaintext token whose public
/// fingerprint is nearest. `queried` are (encrypted ID, fingerprint) rows
/// of width `k`; `public` holds a row per plaintext ID.
///
/// # Errors
/// Widths that disagree.
pub fn match_fingerprints(
    queried_ids: &[u32],
    queried: &[f32],
    public: &[f32],
    k: usize,
    vocab: usize,
) -> Result<RecoveredMap, Error> {
    if queried.len() != queried_ids.len() * k || !public.len().is_multiple_of(k) {
        return Err(Error::Model("fingerprint widths disagree".into()));
    }
    let q = Tensor::from_slice(queried, (queried_ids.len(), k), &Device::Cpu)?;
    let p = Tensor::from_slice(public, (public.len() / k, k), &Device::Cpu)?;
    // |q − p|² = |q|² + |p|² − 2 q·p; the |q|² term does not change the argmin.
    let p_sq = p.sqr()?.sum(1)?.unsqueeze(0)?;
    let mut map = RecoveredMap::empty(vocab);
    const BLOCK: usize = 1024;
    for start in (0..queried_ids.len()).step_by(BLOCK) {
        let len = BLOCK.min(queried_ids.len() - start);
        let dots = q.narrow(0, start, len)?.matmul(&p.t()?)?;
        let dist = p_sq.broadcast_sub(&(dots * 2.0)?)?;
        let best = dist
            .argmin(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        for (c, t) in queried_ids[start..start + len].iter().zip(best) {
            if let Some(slot) = map.0.get_mut(*c as usize) {
                *slot = Some(t);
            }
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Score;
    use ee_engine::testing::{write_tiny_model, TinySpec};

    /// On a tiny model, querying the artifact with every encrypted ID
    /// recovers nearly every token from the shapes alone.
    #[test]
    fn shapes_of_next_token_distributions_identify_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.gguf");
        write_tiny_model(&model, &TinySpec::llama_q4_1()).unwrap();
        let public = ee_engine::load(&model).unwrap();
        let n = public.vocab_size();
        let key = ee_core::Key::from_bytes([4; 32]).vocab_permutation(n as u32);
        let artifact = dir.path().join("server.gguf");
        ee_core::transform::write_server_artifact(&model, &artifact, &key, &mut |_, _| {}).unwrap();
        let server = ee_engine::load(&artifact).unwrap();
        let k = 20;
        let all: Vec<u32> = (0..n as u32).collect();
        let public_fp = fingerprints(public.as_ref(), &all, k).unwrap();
        let server_fp = fingerprints(server.as_ref(), &all, k).unwrap();
        let map = match_fingerprints(&all, &server_fp, &public_fp, k, n).unwrap();
        let s = Score::of(&map, &key, &[]);
        // Exact arithmetic: the encrypted model's shapes are the public
        // model's, so every token with a distinct shape is found.
        assert!(s.vocab_recovered() > 0.95, "{s:?}");
        assert!(fingerprints(public.as_ref(), &all, 0).is_err());
    }
}
