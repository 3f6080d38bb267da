//! Helpers shared by the engine's integration tests.

use std::path::Path;

use candle_core::{Device, Tensor};

/// candle-transformers' `quantized_llama` logits for the last of `tokens`:
/// an independent implementation of the forward pass, on candle's kernels.
pub fn reference_logits(path: &Path, tokens: &[u32]) -> Vec<f32> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut file = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let input = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&input, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}
