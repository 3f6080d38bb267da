//! llama.cpp's own tokenizer tests (`models/ggml-vocab-*.gguf` with
//! `.inp`/`.out`, from the llama-cpp-python sdist): every string of every
//! vocabulary whose kind we support must give exactly llama.cpp's IDs (no
//! BOS, special-token parsing off), and decode back to itself, whole and
//! streamed token by token.

use std::fs;
use std::path::Path;

use ee_client::text::TextCodec;
use ee_core::gguf::GgufHeader;
use ee_core::tokenizer::GgufVocab;
use ee_e2e::llama_cpp_data;

/// The separator of test strings in a `.inp` file.
const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

/// Vocabularies with tests whose tokenizer kind we do not implement yet:
/// WordPiece (BERT, the encoders issue) and Gemma 4's SentencePiece BPE.
const UNSUPPORTED: [&str; 2] = ["ggml-vocab-bert-bge.gguf", "ggml-vocab-gemma-4.gguf"];

struct Outcome {
    name: String,
    kind: String,
    passed: usize,
    total: usize,
    failures: Vec<String>,
}

fn run_vocab(gguf: &Path) -> Outcome {
    let name = gguf.file_name().unwrap().to_string_lossy().into_owned();
    let header = GgufHeader::read(&mut fs::File::open(gguf).unwrap()).unwrap();
    let vocab = GgufVocab::from_header(&header).unwrap();
    let kind = format!("{} / {}", vocab.model, vocab.pre.as_deref().unwrap_or("-"));
    let json = vocab
        .to_hf_tokenizer_json()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let codec = TextCodec::from_json(&json, vocab.bos_token_id, false)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let inp = fs::read_to_string(gguf.with_extension("gguf.inp")).unwrap();
    let out = fs::read_to_string(gguf.with_extension("gguf.out")).unwrap();
    let strings: Vec<&str> = inp
        .strip_suffix(SEPARATOR)
        .unwrap_or(&inp)
        .split(SEPARATOR)
        .collect();
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        strings.len(),
        expected.len(),
        "{name}: .inp and .out disagree"
    );
    let mut failures = Vec::new();
    let mut failed_strings = 0;
    for (text, want) in strings.iter().zip(&expected) {
        let before = failures.len();
        check_string(&codec, text, want, &mut failures);
        failed_strings += usize::from(failures.len() > before);
    }
    Outcome {
        name,
        kind,
        passed: strings.len() - failed_strings,
        total: strings.len(),
        failures,
    }
}

/// Encodes, decodes and streams one test string, recording what fails.
fn check_string(codec: &TextCodec, text: &str, want: &[u32], failures: &mut Vec<String>) {
    let got = codec.encode_text(text).unwrap();
    if got != want {
        failures.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        return;
    }
    let back = codec.decode(&got).unwrap();
    if back != text {
        failures.push(format!("{text:?}: decodes to {back:?}"));
    }
    // Streamed one token at a time, no piece is a broken character
    // (byte-fallback and byte-level tokens split them) and nothing is
    // lost.
    let mut stream = codec.stream();
    let mut streamed = String::new();
    for &id in &got {
        if let Some(piece) = stream.push(id).unwrap() {
            if piece.contains('\u{FFFD}') {
                failures.push(format!("{text:?}: streamed a broken character"));
            }
            streamed.push_str(&piece);
        }
    }
    streamed.push_str(&stream.finish().unwrap().unwrap_or_default());
    if streamed != text {
        failures.push(format!("{text:?}: streams as {streamed:?}"));
    }
}

#[test]
fn every_supported_vocabulary_gives_llama_cpps_ids_and_round_trips() {
    let (dir, _) = llama_cpp_data();
    let mut outcomes = Vec::new();
    let mut paths: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".gguf.inp"))
        .map(|p| p.with_extension(""))
        .collect();
    paths.sort();
    for gguf in paths {
        let name = gguf.file_name().unwrap().to_string_lossy().into_owned();
        if UNSUPPORTED.contains(&name.as_str()) {
            continue;
        }
        outcomes.push(run_vocab(&gguf));
    }
    // The table the README carries.
    for o in &outcomes {
        println!("| {} | {} | {}/{} |", o.name, o.kind, o.passed, o.total);
    }
    assert!(
        outcomes.len() >= 13,
        "only {} vocabularies ran",
        outcomes.len()
    );
    let failed: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.failures.iter().map(move |f| format!("{}: {f}", o.name)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} strings failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
