//! Side by side in one run: our BERT encoder against candle-transformers'
//! `BertModel` (the independent implementation the tests check against),
//! on the same checkpoint and inputs: embeddings per second at batch 1 and
//! batch 32 (candle's inputs padded to a batch tensor, as its examples
//! do). A benchmark, not a test:
//!
//! ```text
//! cargo bench -p ee-engine --bench encoder_vs_candle -- models/all-MiniLM-L6-v2
//! ```

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert;
use ee_engine::ModelFiles;

const TOKENS: usize = 32;
const BATCH: usize = 32;
const REPS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let dir: PathBuf = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_else(|| "models/all-MiniLM-L6-v2".into())
        .into();
    let ours = ModelFiles::open(&dir).unwrap().load_encoder().unwrap();
    let config: bert::Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let theirs = bert::BertModel::load(vb, &config).unwrap();
    let inputs: Vec<Vec<u32>> = (0..BATCH as u32)
        .map(|s| {
            (0..TOKENS as u32)
                .map(|i| 1000 + (s * 131 + i) * 7919 % 29000)
                .collect()
        })
        .collect();

    let run_ours = |batch: usize| {
        let t = Instant::now();
        for chunk in inputs.chunks(batch) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            ours.embed(&refs).unwrap();
        }
        inputs.len() as f64 / t.elapsed().as_secs_f64()
    };
    let run_candle = |batch: usize| {
        let t = Instant::now();
        for chunk in inputs.chunks(batch) {
            let ids = Tensor::new(chunk.to_vec(), &Device::Cpu).unwrap();
            let states = theirs
                .forward(&ids, &ids.zeros_like().unwrap(), None)
                .unwrap();
            // Mean pooling and L2 normalisation, as sentence-transformers.
            let pooled = states.mean(1).unwrap();
            let norm = pooled
                .sqr()
                .unwrap()
                .sum_keepdim(1)
                .unwrap()
                .sqrt()
                .unwrap();
            pooled
                .broadcast_div(&norm)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
        }
        inputs.len() as f64 / t.elapsed().as_secs_f64()
    };
    run_ours(BATCH);
    run_candle(BATCH);
    let mut speeds = [[vec![], vec![]], [vec![], vec![]]];
    for rep in 0..REPS {
        for which in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
            for (b, batch) in [1, BATCH].into_iter().enumerate() {
                speeds[which][b].push(match which {
                    0 => run_ours(batch),
                    _ => run_candle(batch),
                });
            }
        }
    }
    let [[o1, on], [c1, cn]] = speeds.map(|s| s.map(median));
    println!(
        "{} · inputs of {TOKENS} tokens · threads {} · median of {REPS}",
        dir.display(),
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:<16}{:>16}{:>18}",
        "",
        "batch 1 emb/s",
        format!("batch {BATCH} emb/s")
    );
    println!("{:<16}{o1:>16.1}{on:>18.1}", "ee-engine");
    println!("{:<16}{c1:>16.1}{cn:>18.1}", "candle BertModel");
    println!(
        "{:<16}{:>16.3}{:>18.3}",
        "ratio ours/candle",
        o1 / c1,
        on / cn
    );
}
