//! `ee quantize`'s engine side: every file type made from a float tiny
//! model loads in our engine, runs on our kernels, agrees with candle's
//! independent `quantized_llama` on the same file, stays close to the float
//! model, and encrypts bit-exactly.

use candle_core::quantized::GgmlDType;
use ee_core::gguf::GgufHeader;
use ee_core::transform::write_server_artifact;
use ee_core::Key;
use ee_engine::quantize::{quantize_gguf, FileType};
use ee_engine::testing::{write_tiny_model, TinySpec};

mod common;
use common::reference_logits;

/// Float weights; rows of 256 (K-quant super-blocks) except `ffn_down`'s,
/// of 320, which must fall back; eight layers, so Q4_K_M's layer rule
/// picks some (0, 3, 6, 7).
fn spec() -> TinySpec {
    TinySpec {
        weights: GgmlDType::F32,
        embedding: GgmlDType::F32,
        n_embd: 256,
        n_ff: 320,
        n_head: 8,
        n_kv_head: 2,
        n_layers: 8,
        seed: 11,
        ..TinySpec::llama_q4_1()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn every_file_type_runs_on_our_kernels_and_agrees_with_candle() {
    let dir = tempfile::tempdir().unwrap();
    let float = dir.path().join("f32.gguf");
    // One layer: a short path for last-bit differences to grow (below).
    let one_layer = TinySpec {
        n_layers: 1,
        ..spec()
    };
    write_tiny_model(&float, &one_layer).unwrap();
    let original = ee_engine::load(&float).unwrap();
    let tokens: Vec<u32> = (0..24)
        .map(|i| (i * 37 + 5) % original.vocab_size() as u32)
        .collect();
    let exact = original
        .forward_one(&tokens, &mut original.new_cache())
        .unwrap();
    let scale = exact.iter().map(|x| x.abs()).fold(0f32, f32::max);
    for file_type in FileType::ALL {
        let name = file_type.name();
        let out = dir.path().join(format!("{name}.gguf"));
        let changes = quantize_gguf(&float, &out, file_type).unwrap();
        // Our kernels with candle's RMSNorm and SiLU and an f32 KV cache: the
        // comparison below is of kernels, to rounding.
        let opts = ee_engine::LoadOptions {
            candle_elementwise: true,
            kv_cache_dtype: ee_engine::KvCacheDtype::F32,
            ..Default::default()
        };
        let model = ee_engine::load_with(&out, &opts).unwrap();
        // Our kernels run every matrix (candle's would be marked).
        let formats = model.weight_types();
        assert!(!formats.contains("candle"), "{name}: {formats}");
        // Against candle on a short prompt: over longer ones and more
        // layers a last-bit difference now and then rounds an activation to
        // the next 8-bit step, which random layers amplify to ~0.5% of the
        // logits' scale (seen at 4 tokens through 2 layers, and with candle's
        // kernels in our forward pass against ours too). The kernels
        // themselves are checked against candle's to rounding in
        // `quant::tests`.
        let short = &tokens[..4];
        let ours = model.forward_one(short, &mut model.new_cache()).unwrap();
        let diff = max_abs_diff(&ours, &reference_logits(&out, short));
        assert!(
            diff <= 1e-5 * scale,
            "{name}: ours vs candle {diff} (scale {scale})"
        );
        let ours = model.forward_one(&tokens, &mut model.new_cache()).unwrap();
        // Quantization error, loosely bounded by the format's bits.
        let bound = match file_type {
            FileType::F16 => 1e-3,
            FileType::Q8_0 | FileType::Q6K => 0.05,
            _ => 0.3,
        };
        let err = max_abs_diff(&ours, &exact);
        assert!(
            err <= bound * scale,
            "{name}: off the float model by {err} (scale {scale})"
        );
        let header = GgufHeader::read(&mut std::fs::File::open(&out).unwrap()).unwrap();
        assert!(
            header.get("tokenizer.ggml.tokens").is_some(),
            "{name}: tokenizer kept"
        );
        let ftype = header.get("general.file_type").and_then(|v| v.as_u64());
        let want = match file_type {
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4KM => 15,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
        };
        assert_eq!(ftype, Some(want), "{name}");
        assert_eq!(changes.len(), header.tensors.len());
        assert!(
            changes
                .iter()
                .filter(|c| c.name.contains("norm"))
                .all(|c| c.to == "F32"),
            "{name}: norms stay f32"
        );
    }
}

#[test]
fn q4_k_m_mixes_types_as_llama_cpp_does_and_encrypts_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let [float, quant, enc] =
        ["f32", "q4_k_m", "enc"].map(|n| dir.path().join(format!("{n}.gguf")));
    write_tiny_model(&float, &spec()).unwrap();
    let changes = quantize_gguf(&float, &quant, FileType::Q4KM).unwrap();
    let to = |name: &str| changes.iter().find(|c| c.name == name).unwrap().to.clone();
    // The tied embedding is the output head: Q6_K.
    assert_eq!(to("token_embd.weight"), "Q6_K");
    assert_eq!(to("blk.1.attn_q.weight"), "Q4_K");
    assert_eq!(to("blk.0.attn_v.weight"), "Q6_K");
    assert_eq!(to("blk.3.attn_v.weight"), "Q6_K");
    assert_eq!(to("blk.1.attn_v.weight"), "Q4_K");
    // Rows of 320 are not whole super-blocks: Q6_K falls back to Q8_0,
    // Q4_K to Q5_0.
    assert_eq!(to("blk.7.ffn_down.weight"), "Q8_0");
    assert_eq!(to("blk.2.ffn_down.weight"), "Q5_0");

    // The output is readable by whoever could read the input.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&quant) & 0o777, mode(&float) & 0o777);
    }
    // Requantizing a quantized file copies what is already in its type.
    let again = dir.path().join("again.gguf");
    quantize_gguf(&quant, &again, FileType::Q4KM).unwrap();
    assert_eq!(
        std::fs::read(&quant).unwrap(),
        std::fs::read(&again).unwrap()
    );

    let plain = ee_engine::load(&quant).unwrap();
    let perm = Key::from_bytes([9; 32]).vocab_permutation(plain.vocab_size() as u32);
    write_server_artifact(&quant, &enc, &perm, &mut |_, _| {}).unwrap();
    let encrypted = ee_engine::load(&enc).unwrap();
    let tokens: Vec<u32> = (0..16)
        .map(|i| (i * 13 + 2) % plain.vocab_size() as u32)
        .collect();
    let a = plain.forward_one(&tokens, &mut plain.new_cache()).unwrap();
    let b = encrypted
        .forward_one(
            &perm.encrypt_all(&tokens).unwrap(),
            &mut encrypted.new_cache(),
        )
        .unwrap();
    for (t, &logit) in a.iter().enumerate() {
        assert_eq!(
            logit.to_bits(),
            b[perm.encrypt(t as u32).unwrap() as usize].to_bits()
        );
    }
}

#[test]
fn bad_inputs_are_errors_naming_them() {
    let err = "Q3_K_XL".parse::<FileType>().unwrap_err().to_string();
    assert!(err.contains("Q3_K_XL") && err.contains("Q4_K_M"), "{err}");
    assert_eq!("q4_k_m".parse::<FileType>().unwrap(), FileType::Q4KM);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let err = quantize_gguf(&missing, &dir.path().join("out.gguf"), FileType::Q8_0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.gguf"), "{err}");
    assert!(!dir.path().join("out.gguf").exists());
}

/// A BF16 GGUF (llama.cpp's `-BF16.gguf`) quantizes as its values do: the
/// same file as from F32 weights holding the same bf16-rounded values.
#[test]
fn a_bf16_gguf_quantizes_like_its_values_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let [float, bf16, rounded] =
        ["f32", "bf16", "rounded"].map(|n| dir.path().join(format!("{n}.gguf")));
    write_tiny_model(&float, &spec()).unwrap();
    ee_engine::testing::write_bf16_twins(&float, &bf16, &rounded).unwrap();
    for file_type in [FileType::Q8_0, FileType::Q4KM, FileType::F16] {
        let name = file_type.name();
        let [from_bf16, from_rounded] =
            ["bf16", "rounded"].map(|n| dir.path().join(format!("{name}-{n}.gguf")));
        let changes = quantize_gguf(&bf16, &from_bf16, file_type).unwrap();
        quantize_gguf(&rounded, &from_rounded, file_type).unwrap();
        let q = changes
            .iter()
            .find(|c| c.name == "blk.0.attn_q.weight")
            .unwrap();
        assert_eq!(q.from, "BF16", "{name}");
        assert!(
            std::fs::read(&from_bf16).unwrap() == std::fs::read(&from_rounded).unwrap(),
            "{name}: the files differ"
        );
    }
}
