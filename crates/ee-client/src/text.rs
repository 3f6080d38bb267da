//! Text ↔ plaintext token IDs: the Hugging Face tokenizer, llama.cpp's
//! special-token partition in front of it, and an incremental, UTF-8-safe
//! detokenizer for streaming.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::Tokenizer;

use crate::Error;

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
    /// The special tokens' texts, found leftmost-longest (as Hugging Face's
    /// added vocabulary matches them), with their IDs.
    specials: Option<(AhoCorasick, Vec<u32>)>,
    bytes: PieceBytes,
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
    pub fn from_file(path: &Path, bos: Option<u32>, add_bos: bool) -> Result<Self, Error> {
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(tokenizer, bos, add_bos)
    }

    pub fn from_json(
        json: &serde_json::Value,
        bos: Option<u32>,
        add_bos: bool,
    ) -> Result<Self, Error> {
        let bytes = serde_json::to_vec(json).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tokenizer =
            Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Self::new(tokenizer, bos, add_bos)
    }

    fn new(mut tokenizer: Tokenizer, bos: Option<u32>, add_bos: bool) -> Result<Self, Error> {
        tokenizer.set_encode_special_tokens(true);
        let added: HashMap<u32, (String, bool)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, (t.content, t.special)))
            .collect();
        let (texts, ids): (Vec<&str>, Vec<u32>) = added
            .iter()
            .filter(|(_, (text, special))| *special && !text.is_empty())
            .map(|(&id, (text, _))| (text.as_str(), id))
            .unzip();
        let specials = if ids.is_empty() {
            None
        } else {
            let matcher = AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&texts)
                .map_err(|e| Error::Tokenizer(e.to_string()))?;
            Some((matcher, ids))
        };
        let bytes = piece_bytes(&tokenizer);
        Ok(Self {
            tokenizer,
            bos,
            add_bos,
            added,
            specials,
            bytes,
        })
    }

    /// Tokenizes plain text: special-token text (`<|im_end|>`) is text like
    /// any other, and no BOS is added. [`DEFUSE_MARK`]s are dropped first.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, Error> {
        let text = match text.contains(DEFUSE_MARK) {
            true => Cow::Owned(text.replace(DEFUSE_MARK, "")),
            false => Cow::Borrowed(text),
        };
        let enc = self
            .tokenizer
            .encode(text.as_ref(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Makes message text safe to render into a prompt: every special
    /// token's text in it gets a [`DEFUSE_MARK`] after its first character,
    /// so [`encode`](Self::encode) cannot take it for a control token and
    /// tokenizes it as the plain text it is (the mark itself is dropped).
    /// Without this, a message holding `<|im_end|><|im_start|>assistant`
    /// would forge a turn.
    pub fn defuse_specials<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let Some((matcher, _)) = &self.specials else {
            return Cow::Borrowed(text);
        };
        let mut out = String::new();
        let mut at = 0;
        for m in matcher.find_iter(text) {
            let first = text[m.start()..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&text[at..m.start() + first]);
            out.push(DEFUSE_MARK);
            at = m.start() + first;
        }
        if at == 0 {
            return Cow::Borrowed(text);
        }
        out.push_str(&text[at..]);
        Cow::Owned(out)
    }

    /// Tokenizes a whole prompt whose special-token text is meant as control
    /// tokens (a rendered chat template, a raw completion prompt): the text
    /// is cut at special tokens first, as llama.cpp's
    /// `tokenizer_st_partition` does, and each piece between them tokenized
    /// as plain text. BOS is prepended when the model asks for it and the
    /// prompt does not already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.encode_with(text, true)
    }

    /// [`encode`](Self::encode), with the model's BOS only if `add_special`
    /// (transformers' `add_special_tokens`).
    pub fn encode_with(&self, text: &str, add_special: bool) -> Result<Vec<u32>, Error> {
        let mut ids = Vec::new();
        let mut at = 0;
        if let Some((matcher, special_ids)) = &self.specials {
            for m in matcher.find_iter(text) {
                if m.start() > at {
                    ids.extend(self.encode_text(&text[at..m.start()])?);
                }
                ids.push(special_ids[m.pattern().as_usize()]);
                at = m.end();
            }
        }
        if at < text.len() || text.is_empty() {
            ids.extend(self.encode_text(&text[at..])?);
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
    /// An ID outside the vocabulary, named.
    pub fn decode_with_specials(&self, ids: &[u32]) -> Result<String, Error> {
        let size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= size) {
            return Err(Error::Tokenizer(format!(
                "token ID {bad} is outside the vocabulary of {size}"
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

    /// Whether decoding drops this token (a special token).
    pub fn is_special(&self, id: u32) -> bool {
        self.added.get(&id).is_some_and(|(_, special)| *special)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

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
