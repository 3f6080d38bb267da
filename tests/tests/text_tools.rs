//! `ee tokenize`, `ee detokenize` and `ee render-chat` as a user runs them,
//! on llama.cpp's vocabulary-only GGUFs and real templates.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use ee_e2e::{binary, llama_cpp_data};

fn ee(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(binary("ee"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn tokenize_and_detokenize_on_vocabulary_only_ggufs() {
    let (data, _) = llama_cpp_data();
    let spm = data.join("ggml-vocab-llama-spm.gguf");
    let spm = spm.to_str().unwrap();
    // llama.cpp's IDs for " Hello world" (its .out), after the model's BOS.
    let ids = ok(&ee(
        &["tokenize", "--model", spm, "--ids", " Hello world"],
        "",
    ));
    assert_eq!(ids.trim(), "[1,29871,15043,3186]");
    let no_bos = ok(&ee(
        &["tokenize", "--model", spm, "--ids", "--no-bos"],
        " Hello world",
    ));
    assert_eq!(no_bos.trim(), "[29871,15043,3186]");
    let pieces = ok(&ee(
        &["tokenize", "--model", spm, "--pieces", "--no-bos", "é"],
        "",
    ));
    assert_eq!(pieces.trim(), r#"["▁é"]"#);
    // Special-token text is a control token unless parsing is off.
    let parsed = ok(&ee(
        &["tokenize", "--model", spm, "--ids", "--no-bos", "</s>"],
        "",
    ));
    assert_eq!(parsed.trim(), "[2]");
    let text = ok(&ee(
        &[
            "tokenize",
            "--model",
            spm,
            "--ids",
            "--no-bos",
            "--no-parse-special",
            "</s>",
        ],
        "",
    ));
    let text: Vec<u32> = serde_json::from_str(&text).unwrap();
    assert!(text.len() > 1 && !text.contains(&2), "{text:?}");
    // Detokenize gives the text back exactly, specials written out.
    let bpe = data.join("ggml-vocab-llama-bpe.gguf");
    let bpe = bpe.to_str().unwrap();
    let sample = "Ünïcode 🙂 and\ttabs\n";
    let ids = ok(&ee(&["tokenize", "--model", bpe, "--ids"], sample));
    let back = ok(&ee(&["detokenize", "--model", bpe], &ids));
    assert_eq!(back, format!("<|begin_of_text|>{sample}"));
    let listing = ok(&ee(&["tokenize", "--model", bpe, "--no-bos", "Hi"], ""));
    assert_eq!(listing, " 13347 -> \"Hi\"\n");
    // Logprobs' bytes follow the vocabulary's spelling: SentencePiece's
    // byte-fallback pieces are one byte each, `▁` a space.
    let codec = ee_client::model_tool::ModelText::read(&data.join("ggml-vocab-llama-spm.gguf"))
        .unwrap()
        .codec()
        .unwrap();
    assert_eq!(codec.piece(243).as_deref(), Some("<0xF0>"));
    assert_eq!(codec.token_bytes(243), vec![0xF0]);
    assert_eq!(codec.token_bytes(15043), b" Hello".to_vec());
    // Phi-3's special tokens take the whitespace after them, as llama.cpp
    // sets for models named Phi-3.
    let phi3 = ee_client::model_tool::ModelText::read(&data.join("ggml-vocab-phi-3.gguf"))
        .unwrap()
        .codec()
        .unwrap();
    assert_eq!(
        phi3.encode("<|user|>\n Hi<|end|>\n").unwrap(),
        phi3.encode("<|user|>Hi<|end|>").unwrap()
    );
    // An unsupported kind is named; no panic.
    let bert = data.join("ggml-vocab-bert-bge.gguf");
    let out = ee(&["tokenize", "--model", bert.to_str().unwrap(), "hi"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"bert\""));
    let out = ee(&["detokenize", "--model", bpe, "12", "x"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"x\" is not a token ID"));
}

#[test]
fn render_chat_prints_the_prompt_exactly_and_reports_a_refusal() {
    let (data, _) = llama_cpp_data();
    let dir = tempfile::tempdir().unwrap();
    let messages = dir.path().join("messages.json");
    std::fs::write(
        &messages,
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]"#,
    )
    .unwrap();
    let llama = data.join("templates/meta-llama-Llama-3.1-8B-Instruct.jinja");
    let out = ok(&ee(
        &[
            "render-chat",
            "--template",
            llama.to_str().unwrap(),
            "--messages",
            messages.to_str().unwrap(),
            "--add-generation-prompt",
            "--bos-token",
            "<|begin_of_text|>",
        ],
        "",
    ));
    assert!(out.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"));
    assert!(out.contains("Be brief.<|eot_id|>"));
    assert!(
        out.ends_with("<|start_header_id|>assistant<|end_header_id|>\n\n"),
        "{out:?}"
    );
    // Mistral refuses a system message out of place, in its own words.
    let mistral = data.join("templates/mistralai-Mistral-Nemo-Instruct-2407.jinja");
    let out = ee(
        &[
            "render-chat",
            "--template",
            mistral.to_str().unwrap(),
            "--messages",
            "-",
        ],
        r#"[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}]"#,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Only user and assistant roles are supported"));
}
