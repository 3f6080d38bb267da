//! From the server's encrypted deltas to the user's text, one choice at a
//! time: decrypt, detokenize incrementally, apply stop strings, and turn
//! logprobs into token strings.

use ee_core::wire::{FinishReason, TokenLogprob};

use crate::keyholder::KeyHolder;
use crate::text::StreamDecoder;
use crate::upstream::ServerDelta;
use crate::Error;

/// Client-side stop strings. Text that could still be the start of a stop
/// string is held back, so a match never leaks a prefix of it.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    /// Adds text; returns what may be shown now, and whether a stop string
    /// matched (the text then ends just before it).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let released = self.pending[..at].to_owned();
            self.pending.clear();
            return (released, true);
        }
        let keep_from = self.held_back_from();
        let released = self.pending[..keep_from].to_owned();
        self.pending.drain(..keep_from);
        (released, false)
    }

    /// Where the longest tail that begins some stop string starts.
    fn held_back_from(&self) -> usize {
        let p = &self.pending;
        (0..p.len())
            .filter(|&i| p.is_char_boundary(i))
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&p[i..])))
            .unwrap_or(p.len())
    }

    /// The end of the answer: whatever was held back is text after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// An alternative token and its log-probability, in plaintext.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainTopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// A chosen token's log-probability, in plaintext.
#[derive(Debug, Clone, PartialEq)]
pub struct PlainLogprob {
    pub chosen: PlainTopLogprob,
    pub top: Vec<PlainTopLogprob>,
}

/// What one server delta adds to a choice, ready for the user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChoiceDelta {
    pub text: String,
    /// Where `text` starts in the choice's answer, in characters
    /// (completions' logprobs report it).
    pub text_offset: usize,
    /// What the server sent, kept for display ("what the server saw").
    pub encrypted_ids: Vec<u32>,
    pub logprobs: Vec<PlainLogprob>,
    pub finish: Option<FinishReason>,
}

/// One choice being decoded; it also accumulates the whole answer.
pub struct ChoiceDecoder<'a> {
    keys: &'a KeyHolder,
    text: StreamDecoder<'a>,
    stops: StopMatcher,
    pub output: String,
    /// Characters in `output`, kept so a delta's offset costs nothing.
    output_chars: usize,
    pub encrypted_ids: Vec<u32>,
    pub logprobs: Vec<PlainLogprob>,
    pub completion_tokens: usize,
    pub finish: Option<FinishReason>,
    /// The answer ended on a stop string (the server did not end it).
    pub stopped_by_string: bool,
}

impl<'a> ChoiceDecoder<'a> {
    pub fn new(keys: &'a KeyHolder, stops: Vec<String>) -> Self {
        Self {
            keys,
            text: keys.codec().stream(),
            stops: StopMatcher::new(stops),
            output: String::new(),
            output_chars: 0,
            encrypted_ids: Vec::new(),
            logprobs: Vec::new(),
            completion_tokens: 0,
            finish: None,
            stopped_by_string: false,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Applies a server delta. After a stop string matched, the rest of the
    /// server's output for this choice is ignored.
    pub fn push(&mut self, delta: &ServerDelta) -> Result<ChoiceDelta, Error> {
        let mut out = ChoiceDelta {
            text_offset: self.output_chars,
            ..ChoiceDelta::default()
        };
        if self.is_finished() {
            return Ok(out);
        }
        let plain = self.keys.decrypt(&delta.token_ids)?;
        for (i, &id) in plain.iter().enumerate() {
            self.completion_tokens += 1;
            out.encrypted_ids.push(delta.token_ids[i]);
            if let Some(lp) = delta.logprobs.get(i) {
                out.logprobs.push(self.plain_logprob(lp)?);
            }
            if let Some(piece) = self.text.push(id)? {
                let (shown, stopped) = self.stops.push(&piece);
                out.text.push_str(&shown);
                if stopped {
                    out.finish = Some(FinishReason::Stop);
                    self.stopped_by_string = true;
                    break;
                }
            }
        }
        if out.finish.is_none() && delta.finish_reason.is_some() {
            if let Some(rest) = self.text.finish()? {
                let (shown, stopped) = self.stops.push(&rest);
                out.text.push_str(&shown);
                if stopped {
                    out.finish = Some(FinishReason::Stop);
                    self.stopped_by_string = true;
                }
            }
            out.text.push_str(&self.stops.finish());
            out.finish = out.finish.or(delta.finish_reason);
        }
        self.output.push_str(&out.text);
        self.output_chars += out.text.chars().count();
        self.encrypted_ids.extend_from_slice(&out.encrypted_ids);
        self.logprobs.extend(out.logprobs.iter().cloned());
        self.finish = out.finish;
        Ok(out)
    }

    fn plain_logprob(&self, lp: &TokenLogprob) -> Result<PlainLogprob, Error> {
        let entry = |cipher: u32, logprob: f32| -> Result<PlainTopLogprob, Error> {
            let plain = self.keys.decrypt(&[cipher])?[0];
            let bytes = self.keys.codec().token_bytes(plain);
            Ok(PlainTopLogprob {
                token: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
                logprob,
            })
        };
        Ok(PlainLogprob {
            chosen: entry(lp.token_id, lp.logprob)?,
            top: lp
                .top_logprobs
                .iter()
                .map(|t| entry(t.token_id, t.logprob))
                .collect::<Result<_, _>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut shown = Vec::new();
        for p in pieces {
            let (text, stopped) = m.push(p);
            shown.push(text);
            if stopped {
                return (shown, true);
            }
        }
        shown.push(m.finish());
        (shown, false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_is_never_shown() {
        let (shown, stopped) = run(&["\n\nUser:"], &["Hello", " there\n", "\nUs", "er: hi"]);
        assert!(stopped);
        assert_eq!(shown.concat(), "Hello there");
        // Nothing of the stop string was released before it matched.
        assert_eq!(shown[1], " there");
    }

    #[test]
    fn a_near_miss_is_released_in_the_end() {
        let (shown, stopped) = run(&["STOP"], &["ST", "O", "P?"]);
        assert!(stopped);
        assert_eq!(shown.concat(), "");
        let (shown, stopped) = run(&["STOP"], &["ST", "OW"]);
        assert!(!stopped);
        assert_eq!(shown, vec!["", "STOW", ""]);
        let (shown, stopped) = run(&["STOP"], &["abc ST"]);
        assert!(!stopped);
        assert_eq!(shown, vec!["abc ", "ST"]);
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        let (shown, stopped) = run(&["b", "é"], &["aébc"]);
        assert!(stopped);
        assert_eq!(shown.concat(), "a");
        let (shown, _) = run(&["日本語"], &["日本", "人"]);
        assert_eq!(shown.concat(), "日本人");
    }

    #[test]
    fn no_stops_release_everything_at_once() {
        let (shown, stopped) = run(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(shown, vec!["a", "b", ""]);
    }
}
