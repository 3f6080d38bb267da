//! Our engine against an independent implementation, candle-transformers'
//! `quantized_llama`, on the real GGUF.

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use ee_e2e::model_path;

const PROMPT: [u32; 16] = [
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];

fn argmax(v: &[f32]) -> u32 {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
        .unwrap() as u32
}

fn candle_model() -> ModelWeights {
    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap()
}

/// candle's logits after `tokens`, fed at position `pos`.
fn candle_logits(model: &mut ModelWeights, tokens: &[u32], pos: usize) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input, pos).unwrap();
    logits.squeeze(0).unwrap().to_vec1().unwrap()
}

#[test]
fn logits_agree_and_greedy_tokens_match_candle_but_at_near_ties() {
    let ours = ee_engine::load(&model_path()).unwrap();
    let mut theirs = candle_model();

    let mut cache = ours.new_cache();
    let mut tokens = PROMPT.to_vec();
    let mut ours_logits: Vec<f32> = ours.forward_one(&tokens, &mut cache).unwrap();
    let mut their_logits = candle_logits(&mut theirs, &tokens, 0);
    let mut near_ties = 0;
    for step in 0..32 {
        let scale = their_logits.iter().fold(0f32, |m, x| m.max(x.abs()));
        // Activations are quantized to 8 bits before every quantized matmul.
        // That rounding is discontinuous: our AVX2 kernel and candle's scalar
        // one sum in different orders, a last-bit difference can flip a
        // rounding, and 30 layers compound it (llama.cpp and candle differ
        // from each other the same way). Hence a tolerance of a few percent
        // on the worst logit, a tight one on the mean, and the same greedy
        // text but for near-ties (below).
        // Logits are centred first: softmax ignores a common offset.
        let centred = |v: &[f32]| {
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            v.iter().map(|x| x - mean).collect::<Vec<f32>>()
        };
        let (a, b) = (centred(&ours_logits), centred(&their_logits));
        let diffs: Vec<f32> = a.iter().zip(&b).map(|(a, b)| (a - b).abs()).collect();
        let max = diffs.iter().fold(0f32, |m, d| m.max(*d));
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        assert!(
            max <= 0.08 * scale,
            "step {step}: worst logit differs by {max} (scale {scale})"
        );
        assert!(
            mean <= 0.01 * scale,
            "step {step}: logits differ by {mean} on average (scale {scale})"
        );
        let (a, b) = (argmax(&ours_logits), argmax(&their_logits));
        if a != b {
            // Different summation orders may break a near-tie either way:
            // a split is accepted only where both models rank the two
            // tokens within 1% of the logit scale (an eighth of the worst
            // logit's tolerance above), at most twice; both then go on with
            // candle's token, so every step is compared. (Measured: a split
            // at margins of 0.85% and 0.16% once our RMSNorm summed its
            // squares exactly and candle in f32.)
            let margin = |l: &[f32]| (l[a as usize] - l[b as usize]).abs();
            assert!(
                margin(&ours_logits) <= 0.01 * scale && margin(&their_logits) <= 0.01 * scale,
                "greedy token differs at step {step} ({a} vs {b}): margins {} and {} (scale {scale})",
                margin(&ours_logits),
                margin(&their_logits)
            );
            near_ties += 1;
            assert!(
                near_ties <= 2,
                "{near_ties} near-ties split the greedy texts"
            );
        }
        let a = b;
        let pos = tokens.len();
        tokens.push(a);
        ours_logits = ours.forward_one(&[a], &mut cache).unwrap();
        their_logits = candle_logits(&mut theirs, &[a], pos);
    }
}

#[test]
fn on_candles_kernels_our_forward_pass_matches_candle_to_rounding() {
    let opts = ee_engine::LoadOptions {
        candle_kernels: true,
        candle_elementwise: true,
    };
    let ours = ee_engine::load_with(&model_path(), &opts).unwrap();
    let logits: Vec<f32> = ours.forward_one(&PROMPT, &mut ours.new_cache()).unwrap();
    let mut theirs = candle_model();
    let reference = candle_logits(&mut theirs, &PROMPT, 0);
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = logits
        .iter()
        .zip(&reference)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-4 * scale,
        "logits differ by {diff} (scale {scale})"
    );
}
