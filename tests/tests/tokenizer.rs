//! The tokenizer the model tool rebuilds from GGUF metadata, on the real model.

use ee_client::model_tool::ModelText;
use ee_e2e::model_path;

#[test]
fn round_trips_text_with_accents_emoji_and_whitespace() {
    let text = ModelText::read(&model_path()).unwrap();
    let codec = text.codec().unwrap();
    for s in [
        "Hello, world!",
        "Ça va ? Déjà vu — naïve café, Zürich, São Paulo.",
        "emoji 🙂🚀👩‍👩‍👧 and 日本語のテキスト, Ελληνικά, русский",
        "  leading spaces\n\ttabs and\r\nnewlines  ",
        "digits 1234567890 and 3.14159",
        "fn main() { println!(\"{}\", 42); }",
    ] {
        let ids = codec.encode(s).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(codec.decode(&ids).unwrap(), s);
        // Streaming detokenization never emits a broken character and loses nothing.
        let mut stream = codec.stream();
        let mut out = String::new();
        for id in ids {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{s:?}: piece {piece:?}");
                out.push_str(&piece);
            }
        }
        if let Some(rest) = stream.finish().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, s);
    }
}

#[test]
fn special_tokens_map_to_their_ids_and_known_text_to_known_ids() {
    let text = ModelText::read(&model_path()).unwrap();
    let codec = text.codec().unwrap();
    assert_eq!(codec.encode("<|endoftext|>").unwrap(), vec![0]);
    assert_eq!(codec.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(codec.encode("<|im_end|>").unwrap(), vec![2]);
    // llama.cpp's tokenization of the same text (its greedy answer follows from it).
    assert_eq!(
        codec.encode("What is the capital of France?").unwrap(),
        vec![1780, 314, 260, 3575, 282, 4649, 47]
    );
    // SmolLM's pre-tokenizer splits digits one by one.
    let digits = codec.encode("2024").unwrap();
    assert_eq!(digits.len(), 4);
    assert_eq!(text.special.bos_id, Some(1));
    assert_eq!(text.special.eos_id, Some(2));
    assert!(!text.special.add_bos);
    assert_eq!(text.special.stop_ids, vec![2]);
    // Special tokens are dropped when decoding an answer.
    assert_eq!(codec.decode(&[1780, 2]).unwrap(), "What");
}
