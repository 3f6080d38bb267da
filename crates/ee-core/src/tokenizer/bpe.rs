//! `tokenizer.ggml.model = "gpt2"`: byte-level BPE (GPT-2, Llama 3, Qwen2,
//! DeepSeek, StarCoder, ...). The merges ship in the GGUF; what differs by
//! model family is the pre-tokenizer, named by `tokenizer.ggml.pre`.
//!
//! Each pre-tokenizer is the sequence of regex splits of that family's
//! Hugging Face `tokenizer.json`, as llama.cpp lists them per pre type in
//! `llm_tokenizer_bpe` (each split cuts the pieces the previous one left,
//! keeping both matches and gaps), followed by GPT-2's byte-to-character
//! mapping.

use serde_json::{json, Value as Json};

use super::GgufVocab;
use crate::Error;

/// GPT-2's word split (also the one inside `ByteLevel(use_regex)`).
pub(super) const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's, with numbers in groups of up to three digits.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's: Llama 3's with every digit alone.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's: Qwen2's with combining marks kept in words.
const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken (Mistral Nemo, Pixtral): case-aware words.
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's letters: Latin, Greek, Cyrillic and the other cased
/// scripts, as the model's own tokenizer spells them out. Written as code
/// points: some of these characters have other forms that NFC (an editor, a
/// terminal) would silently swap in, emptying a range.
const DEEPSEEK_LLM_LETTERS: &str = r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+";
/// DeepSeek's ASCII and full-width punctuation.
const DEEPSEEK_PUNCTUATION: &str =
    r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+";
/// CJK ideographs, the blocks before them, and Hangul (DeepSeek).
const CJK_HANGUL: &str = r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+";

/// How one `tokenizer.ggml.pre` splits text before BPE.
struct PreTokenizer {
    /// Regex splits applied in order, each keeping matches and gaps.
    splits: &'static [&'static str],
    /// A word that is itself a token is taken whole, without merges
    /// (Hugging Face's `ignore_merges`, llama.cpp's `ignore_merges`).
    ignore_merges: bool,
    /// Whether prompts start with BOS when the GGUF does not say
    /// (`tokenizer.ggml.add_bos_token`): llama.cpp's default per family.
    adds_bos: bool,
}

/// The pre-tokenizers we implement, by `tokenizer.ggml.pre`. Every one with
/// a vocabulary in llama.cpp's tokenizer tests is proven on it.
fn pre_tokenizer(pre: &str) -> Option<PreTokenizer> {
    let plain = |splits| PreTokenizer {
        splits,
        ignore_merges: false,
        adds_bos: false,
    };
    Some(match pre {
        // llama.cpp's fallback for a GGUF that names no pre-tokenizer.
        "default" => plain(&[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]),
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" => plain(&[GPT2]),
        // Every digit alone, then GPT-2's split.
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            plain(&[r"\p{N}", GPT2])
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => PreTokenizer {
            splits: &[LLAMA3],
            ignore_merges: true,
            adds_bos: true,
        },
        "dbrx" | "smaug-bpe" => plain(&[LLAMA3]),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => plain(&[QWEN2]),
        "qwen35" => plain(&[QWEN35]),
        "tekken" => PreTokenizer {
            splits: &[TEKKEN],
            ignore_merges: true,
            adds_bos: true,
        },
        "deepseek-llm" => plain(&[
            r"[\r\n]",
            DEEPSEEK_LLM_LETTERS,
            DEEPSEEK_PUNCTUATION,
            r"\s+$",
            CJK_HANGUL,
            r"\p{N}+",
        ]),
        "deepseek-coder" => plain(&[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_HANGUL, r"\p{N}"]),
        "falcon" => plain(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"]),
        _ => return None,
    })
}

/// Whether a `gpt2` vocabulary with this `tokenizer.ggml.pre` starts
/// prompts with BOS when its GGUF does not say.
pub fn adds_bos_by_default(pre: Option<&str>) -> bool {
    pre_tokenizer(pre.unwrap_or("default")).is_some_and(|p| p.adds_bos)
}

/// The pre-tokenizer names [`tokenizer_json`] accepts, for error messages.
pub const SUPPORTED_PRE: &str = "gpt-2, llama-bpe (llama3), qwen2, qwen35, deepseek-llm, \
     deepseek-coder, deepseek-r1-qwen, starcoder, refact, command-r, smollm, falcon, mpt, \
     dbrx, smaug-bpe, stablelm2, tekken, phi-2, olmo, jais, codeshell, exaone, minerva-7b";

/// The Hugging Face `tokenizer.json` of a `gpt2` vocabulary.
///
/// # Errors
/// An unknown `tokenizer.ggml.pre` is refused, named.
pub fn tokenizer_json(vocab: &GgufVocab) -> Result<Json, Error> {
    let pre = vocab.pre.as_deref().unwrap_or("default");
    let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| {
        Error::Tokenizer(format!(
            "pre-tokenizer {pre:?} (tokenizer.ggml.pre) is not supported; supported: {SUPPORTED_PRE}"
        ))
    })?;
    let mut steps: Vec<Json> = pre_tokenizer
        .splits
        .iter()
        .map(|regex| {
            json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
        })
        .collect();
    steps.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(),
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            // Byte-level BPE covers every byte, so it never needs <unk>.
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre_tokenizer.ignore_merges,
            "vocab": vocab.vocab_map(),
            "merges": vocab.merges,
        }
    }))
}
