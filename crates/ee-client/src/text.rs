//! Text ↔ plaintext token IDs: the Hugging Face tokenizer, llama.cpp's
//! special-token partition in front of it, and an incremental, UTF-8-safe
//! detokenizer for streaming.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::Tokenizer;

use crate::Error;
use budget::TokenBudget;

mod budget;
mod input;

/// Breaks special-token text in message contents (see
/// [`TextCodec::defuse_specials`]). A Unicode noncharacter, which the
/// standard reserves for a program's internal use: no text should carry one,
/// and one that does loses it.
pub const DEFUSE_MARK: char = '\u{FDD0}';

/// A tokenizer plus the special-token rules of its model.
pub struct TextCodec {
    /// Never turns text into special tokens (`encode_special_tokens`): the
    /// partition below is the only way one is made.
    tokenizer: Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    /// Added tokens by ID: (text, special). The tokenizer builds this map
    /// afresh on each request for it, and logprobs ask per token.
    added: HashMap<u32, (String, bool)>,
    specials: Option<Specials>,
    bytes: PieceBytes,
    /// Text provably longer than this many tokens is refused before the
    /// tokenizer sees it ([`with_token_limit`](Self::with_token_limit)).
    budget: Option<TokenBudget>,
}

/// The special tokens, and how to find them in text.
struct Specials {
    /// Leftmost-longest, as Hugging Face's added vocabulary matches them:
    /// cuts a prompt.
    cut: AhoCorasick,
    /// Every occurrence, overlapping ones too: defuses message text.
    every: AhoCorasick,
    /// By pattern: the ID, and whether the token takes the whitespace on
    /// its left / right (`lstrip` / `rstrip`).
    tokens: Vec<(u32, bool, bool)>,
    ids: HashSet<u32>,
}

/// How a vocabulary piece spells bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceBytes {
    /// GPT-2's byte-to-character table (byte-level BPE).
    ByteLevel,
    /// SentencePiece: `▁` is a space and `<0xNN>` is byte NN.
    SentencePiece,
    /// The piece's own UTF-8.
    Plain,
}

impl TextCodec {
    /// A codec from a Hugging Face `tokenizer.json` file. `bos` is prepended
    /// to prompts when `add_bos`.
    ///
    /// # Errors
    /// The file cannot be read or is not a tokenizer, named.
    pub fn from_file(path: &Path, bos: Option<u32>, add_bos: bool) -> Result<Self, Error> {
        let named =
            |e: &dyn std::fmt::Display| Error::Tokenizer(format!("{}: {e}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| named(&e))?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| named(&e))?;
        Self::from_json(&json, bos, add_bos).map_err(|e| named(&e))
    }

    /// A codec from a `tokenizer.json` value.
    ///
    /// # Errors
    /// The value is not a tokenizer.
    pub fn from_json(
        json: &serde_json::Value,
        bos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, Error> {
        Self::from_json_for_template(json, bos, add_bos, None)
    }

    /// [`from_json`](Self::from_json) for chats rendered with `template`:
    /// an added token whose marker-like text (with `<`, `>`, `[`, `]` or
    /// `|`) the template writes is a turn marker, and is made special even
    /// where the vocabulary types it user-defined (as Command R's
    /// `<|START_OF_TURN_TOKEN|>` is), so that only the template can produce
    /// it.
    pub fn from_json_for_template(
        json: &serde_json::Value,
        bos: Option<u32>,
        add_bos: bool,
        template: Option<&str>,
    ) -> Result<Self, Error> {
        let mut json = json.clone();
        if let (Some(template), Some(added)) = (
            template,
            json.get_mut("added_tokens").and_then(|a| a.as_array_mut()),
        ) {
            for token in added {
                // Marker-like text only (`<|...|>`, `[INST]`): a
                // user-defined token for plain text such as a run of
                // spaces stays what it is.
                let written = token["content"]
                    .as_str()
                    .is_some_and(|t| t.contains(['<', '>', '[', ']', '|']) && template.contains(t));
                if written {
                    token["special"] = true.into();
                }
            }
        }
        let bytes = serde_json::to_vec(&json).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tokenizer =
            Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Self::new(tokenizer, bos, add_bos)
    }

    fn new(mut tokenizer: Tokenizer, bos: Option<u32>, add_bos: bool) -> Result<Self, Error> {
        tokenizer.set_encode_special_tokens(true);
        // Inputs are encoded one by one and cut by the caller: a
        // tokenizer.json's own padding or truncation (all-MiniLM-L6-v2's
        // pads and cuts to 128) would change them silently.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let decoder = tokenizer.get_added_tokens_decoder();
        let added: HashMap<u32, (String, bool)> = decoder
            .iter()
            .map(|(&id, t)| (id, (t.content.clone(), t.special)))
            .collect();
        let mut special: Vec<(&str, (u32, bool, bool))> = decoder
            .iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(&id, t)| (t.content.as_str(), (id, t.lstrip, t.rstrip)))
            .collect();
        special.sort_by_key(|&(_, (id, ..))| id);
        let specials = if special.is_empty() {
            None
        } else {
            let texts: Vec<&str> = special.iter().map(|(t, _)| *t).collect();
            let build = |kind| {
                AhoCorasick::builder()
                    .match_kind(kind)
                    .build(&texts)
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            };
            Some(Specials {
                cut: build(MatchKind::LeftmostLongest)?,
                every: build(MatchKind::Standard)?,
                tokens: special.iter().map(|(_, t)| *t).collect(),
                ids: special.iter().map(|(_, (id, ..))| *id).collect(),
            })
        };
        let bytes = piece_bytes(&tokenizer);
        Ok(Self {
            tokenizer,
            bos,
            add_bos,
            added,
            specials,
            bytes,
            budget: None,
        })
    }

    /// Refuses, before tokenizing it, text that must hold more than `limit`
    /// tokens (a model's context length), so that a huge prompt costs
    /// memory in proportion to the context, not to its own size. Not set
    /// for a tokenizer where a text's length does not bound its token count
    /// (see `text/budget.rs`).
    pub fn with_token_limit(mut self, limit: usize) -> Self {
        let longest = (0..self.vocab_size() as u32)
            .chain(self.added.keys().copied())
            .map(|id| self.spelled_len(id))
            .max()
            .unwrap_or(0);
        let strip_specials = self
            .specials
            .as_ref()
            .is_some_and(|s| s.tokens.iter().any(|&(_, lstrip, rstrip)| lstrip || rstrip));
        self.budget = TokenBudget::new(&self.tokenizer, strip_specials, longest, limit);
        self
    }

    /// How many bytes of text a token stands for, at most: what
    /// [`token_bytes`](Self::token_bytes) gives, or for a vocabulary that
    /// spells pieces as plain text, the piece's own length.
    fn spelled_len(&self, id: u32) -> usize {
        if let Some((text, _)) = self.added.get(&id) {
            return text.len();
        }
        let piece = self.tokenizer.id_to_token(id).unwrap_or_default();
        match self.bytes {
            PieceBytes::ByteLevel => piece.chars().count(),
            PieceBytes::SentencePiece => sentencepiece_bytes(&piece).len(),
            PieceBytes::Plain => piece.len(),
        }
    }

    /// Whether `text`, [`DEFUSE_MARK`]s aside, fits the token budget.
    fn check_budget(&self, text: &str) -> Result<(), Error> {
        match &self.budget {
            Some(budget) => {
                let marks = text.matches(DEFUSE_MARK).count() * DEFUSE_MARK.len_utf8();
                budget.check(text.len() - marks)
            }
            None => Ok(()),
        }
    }

    /// Tokenizes plain text: special-token text (`<|im_end|>`) is text like
    /// any other, and no BOS is added. [`DEFUSE_MARK`]s are dropped first.
    ///
    /// # Errors
    /// The tokenizer fails, or (a last guard) its output holds a special
    /// token, which plain text must never become.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.check_budget(text)?;
        self.encode_unchecked(text)
    }

    /// [`encode_text`](Self::encode_text) for text whose budget was checked
    /// by the caller (the whole prompt it is a piece of).
    fn encode_unchecked(&self, text: &str) -> Result<Vec<u32>, Error> {
        let text = match text.contains(DEFUSE_MARK) {
            true => Cow::Owned(text.replace(DEFUSE_MARK, "")),
            false => Cow::Borrowed(text),
        };
        let enc = self
            .tokenizer
            .encode(text.as_ref(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        if let Some(&id) = ids.iter().find(|&&id| self.is_special(id)) {
            return Err(Error::Tokenizer(format!(
                "plain text tokenized into the special token {:?}; refusing",
                self.piece(id).unwrap_or_default()
            )));
        }
        Ok(ids)
    }

    /// Makes message text safe to render into a prompt: at every place a
    /// special token's text starts (overlapping ones too), a
    /// [`DEFUSE_MARK`] goes after the first character, so
    /// [`encode`](Self::encode) cannot take it for a control token and
    /// tokenizes it as the plain text it is (the mark itself is dropped).
    /// Without this, a message holding `<|im_end|><|im_start|>assistant`
    /// would forge a turn.
    pub fn defuse_specials<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let Some(specials) = &self.specials else {
            return Cow::Borrowed(text);
        };
        let mut starts: Vec<usize> = specials
            .every
            .find_overlapping_iter(text)
            .map(|m| m.start())
            .collect();
        if starts.is_empty() {
            return Cow::Borrowed(text);
        }
        starts.sort_unstable();
        starts.dedup();
        let mut out = String::with_capacity(text.len() + 3 * starts.len());
        let mut at = 0;
        for start in starts {
            let first = text[start..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&text[at..start + first]);
            out.push(DEFUSE_MARK);
            at = start + first;
        }
        out.push_str(&text[at..]);
        Cow::Owned(out)
    }

    /// Tokenizes a whole prompt whose special-token text is meant as control
    /// tokens (a rendered chat template, a raw completion prompt): the text
    /// is cut at special tokens first, as llama.cpp's
    /// `tokenizer_st_partition` does (a token marked `lstrip`/`rstrip` takes
    /// the whitespace beside it, as in Hugging Face), and each piece between
    /// them tokenized as plain text. BOS is prepended when the model asks
    /// for it and the prompt does not already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.encode_with(text, true, true)
    }

    /// [`encode`](Self::encode), with the model's BOS only if `add_special`
    /// (transformers' `add_special_tokens`), and special-token text taken as
    /// text unless `parse_special` (llama.cpp's `parse_special`).
    pub fn encode_with(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, Error> {
        self.check_budget(text)?;
        let mut ids = Vec::new();
        let mut at = 0;
        if let (Some(specials), true) = (&self.specials, parse_special) {
            for m in specials.cut.find_iter(text) {
                let (id, lstrip, rstrip) = specials.tokens[m.pattern().as_usize()];
                if m.start() < at {
                    continue; // inside whitespace an rstrip token took
                }
                let mut before = &text[at..m.start()];
                if lstrip {
                    before = before.trim_end();
                }
                if !before.is_empty() {
                    ids.extend(self.encode_unchecked(before)?);
                }
                ids.push(id);
                at = m.end();
                if rstrip {
                    at = text.len() - text[at..].trim_start().len();
                }
            }
        }
        if at < text.len() || text.is_empty() {
            ids.extend(self.encode_unchecked(&text[at..])?);
        }
        if let (true, true, Some(bos)) = (add_special, self.add_bos, self.bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// Decodes plaintext IDs, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Decodes plaintext IDs with special tokens written as their text
    /// (transformers' `decode(ids)`, llama.cpp's `detokenize` with
    /// `unparse_special`): what `ee detokenize` and `/detokenize` show.
    ///
    /// # Errors
    /// An ID the vocabulary does not have, named.
    pub fn decode_with_specials(&self, ids: &[u32]) -> Result<String, Error> {
        if let Some(bad) = ids
            .iter()
            .find(|&&id| self.tokenizer.id_to_token(id).is_none())
        {
            return Err(Error::Tokenizer(format!(
                "token ID {bad} is not in the vocabulary of {}",
                self.vocab_size()
            )));
        }
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The vocabulary's own piece for an ID (`Ġhello`, `▁hello`, `<0x0A>`),
    /// as transformers' `convert_ids_to_tokens` gives it.
    pub fn piece(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// The bytes one token stands for, as OpenAI's logprobs report them:
    /// a special token is its text; otherwise the piece read by the
    /// vocabulary's own byte spelling (a lone piece of a multi-byte character
    /// is not valid UTF-8 on its own, so decoding it alone would lose it).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some((text, _)) = self.added.get(&id) {
            return text.clone().into_bytes();
        }
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        let spelled = match self.bytes {
            PieceBytes::ByteLevel => piece.chars().map(byte_level_byte).collect(),
            PieceBytes::SentencePiece => Some(sentencepiece_bytes(&piece)),
            PieceBytes::Plain => None,
        };
        spelled.unwrap_or_else(|| self.decode(&[id]).unwrap_or_default().into_bytes())
    }

    /// The ID of the special token spelled `text` (`[TOOL_CALLS]`).
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.added
            .iter()
            .find(|(id, (t, _))| t == text && self.is_special(**id))
            .map(|(id, _)| *id)
    }

    /// Whether decoding drops this token (a special token).
    pub fn is_special(&self, id: u32) -> bool {
        self.specials.as_ref().is_some_and(|s| s.ids.contains(&id))
    }

    /// The number of pieces, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// An incremental detokenizer for one answer.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            codec: self,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Which byte spelling the tokenizer's decoder uses.
fn piece_bytes(tokenizer: &Tokenizer) -> PieceBytes {
    let json = serde_json::to_value(tokenizer.get_decoder()).unwrap_or_default();
    let text = json.to_string();
    if text.contains("\"ByteLevel\"") {
        PieceBytes::ByteLevel
    } else if text.contains("\"ByteFallback\"") || text.contains("\"Metaspace\"") {
        PieceBytes::SentencePiece
    } else {
        PieceBytes::Plain
    }
}

/// A SentencePiece piece's bytes: `<0xNN>` is one byte, `▁` a space.
fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    let hex = piece
        .strip_prefix("<0x")
        .and_then(|p| p.strip_suffix('>'))
        .filter(|h| h.len() == 2);
    if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
        return vec![b];
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// GPT-2's byte-level alphabet, inverted: printable bytes stand for
/// themselves, the other 68 are shifted to U+0100 and up, in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let code = u32::from(c);
    if let Ok(b) = u8::try_from(code) {
        if printable(b) {
            return Some(b);
        }
    }
    let shifted = code.checked_sub(256)?;
    (0..=255u8).filter(|&b| !printable(b)).nth(shifted as usize)
}

/// Turns a stream of token IDs into text pieces without ever splitting a
/// multi-byte character: a piece is released only once the bytes decoded so
/// far end on a character boundary.
pub struct StreamDecoder<'a> {
    codec: &'a TextCodec,
    ids: Vec<u32>,
    /// Start of the window re-decoded for context (byte-level BPE and
    /// leading-space handling need the previous tokens).
    prefix_offset: usize,
    /// Tokens whose text has been released.
    read_offset: usize,
}

impl StreamDecoder<'_> {
    /// Text the held tokens add beyond what was released, if it is whole
    /// characters; the previous tokens are decoded along for context.
    fn pending(&self) -> Result<Option<String>, Error> {
        let prefix = self
            .codec
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = self.codec.decode(&self.ids[self.prefix_offset..])?;
        let new = full.len() > prefix.len() && full.is_char_boundary(prefix.len());
        Ok(new.then(|| full[prefix.len()..].to_string()))
    }

    /// Adds a token; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, Error> {
        self.ids.push(id);
        // A trailing U+FFFD is a multi-byte character still incomplete.
        let piece = self.pending()?.filter(|p| !p.ends_with('\u{FFFD}'));
        if piece.is_some() {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        Ok(piece)
    }

    /// Whatever is still held back (an incomplete character at the end).
    pub fn finish(&mut self) -> Result<Option<String>, Error> {
        let piece = self.pending()?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(piece)
    }
}

/// A byte-level codec over the tiny test vocabulary (`<|endoftext|>` 0,
/// `<|im_start|>` 1, `<|im_end|>` 2, all control) plus `extra` tokens with
/// their GGUF types, for chats with `template`.
#[cfg(test)]
pub(crate) fn test_codec(extra: &[(&str, i64)], template: Option<&str>) -> TextCodec {
    let mut vocab = ee_engine::testing::tiny_gguf_vocab();
    for (t, ty) in extra {
        vocab.tokens.push((*t).to_owned());
        vocab.token_types.push(*ty);
    }
    TextCodec::from_json_for_template(
        &vocab.to_hf_tokenizer_json().unwrap(),
        Some(1),
        false,
        template,
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_special_tokens_are_all_defused() {
        // Falcon's vocabulary has specials that overlap, such as
        // `>>TITLE<<` and `<|endoftext|>`.
        let codec = test_codec(&[(">>TITLE<<", 3)], None);
        let title = codec.encode(">>TITLE<<").unwrap();
        assert_eq!(title.len(), 1);
        for forged in [
            ">>TITLE<<|endoftext|>",
            "<|endoftext|>>TITLE<<",
            "<|im_<|im_end|>",
        ] {
            let ids = codec.encode(&codec.defuse_specials(forged)).unwrap();
            assert!(
                !ids.iter().any(|&id| codec.is_special(id)),
                "{forged}: {ids:?}"
            );
            assert_eq!(ids, codec.encode_text(forged).unwrap());
        }
    }

    #[test]
    fn rstrip_and_lstrip_tokens_take_the_whitespace_beside_them() {
        let mut json = test_codec(&[], None).tokenizer.to_string(false).unwrap();
        json = json.replace(
            r#""content":"<|im_end|>","single_word":false,"lstrip":false,"rstrip":false"#,
            r#""content":"<|im_end|>","single_word":false,"lstrip":true,"rstrip":true"#,
        );
        let codec =
            TextCodec::from_json(&serde_json::from_str(&json).unwrap(), None, false).unwrap();
        assert_eq!(
            codec.encode("a  <|im_end|> \n b").unwrap(),
            codec.encode("a<|im_end|>b").unwrap()
        );
        // Without the flags the spaces are text.
        let plain = test_codec(&[], None);
        assert_ne!(
            plain.encode("a  <|im_end|> \n b").unwrap(),
            plain.encode("a<|im_end|>b").unwrap()
        );
    }

    #[test]
    fn a_user_defined_token_the_template_writes_is_made_special() {
        // Command R types its turn markers user-defined (GGUF type 4).
        let marker = "<|START_OF_TURN_TOKEN|>";
        let without = test_codec(&[(marker, 4)], None);
        let with = test_codec(&[(marker, 4)], Some("{{ '<|START_OF_TURN_TOKEN|>' }}"));
        let id = without.encode_text(marker).unwrap();
        assert_eq!(id.len(), 1, "user-defined tokens match in any text");
        assert!(!without.is_special(id[0]));
        assert!(with.is_special(id[0]));
        assert!(
            with.encode_text(marker).unwrap().len() > 1,
            "now text is text"
        );
        assert_eq!(
            with.encode(marker).unwrap(),
            id,
            "and the template can still write it"
        );
    }

    #[test]
    fn byte_level_alphabet_inverts_gpt2s_table() {
        assert_eq!(byte_level_byte('a'), Some(b'a'));
        assert_eq!(byte_level_byte('\u{0120}'), Some(b' ')); // Ġ
        assert_eq!(byte_level_byte('\u{010A}'), Some(b'\n')); // Ċ
        assert_eq!(byte_level_byte('\u{0100}'), Some(0));
        assert_eq!(byte_level_byte('\u{0143}'), Some(0xAD)); // the last shifted byte
        assert_eq!(byte_level_byte('\u{0144}'), None);
        assert_eq!(byte_level_byte('é'), Some(0xE9));
    }
}
