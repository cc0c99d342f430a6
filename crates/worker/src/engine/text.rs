//! Turning token bytes into streamed text: UTF-8 reassembly across token boundaries, stop
//! strings that hold back only the text that might still become a stop string, and token ids
//! released only together with their text ([`Detokenizer`]).

/// Collects token bytes and releases only whole UTF-8 characters.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Adds bytes and returns the text that is now complete. Invalid sequences become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("valid prefix"),
                    );
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Releases whatever is left (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    /// True while the bytes pushed so far end inside a character.
    pub fn is_mid_character(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// The first position in `text` where one of `stops` occurs.
fn first_stop(stops: &[String], text: &str) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// Where the longest suffix of `text` that is a prefix of some stop string begins (`text.len()`
/// when there is none): text from there on may still become a stop string.
fn hold_from(stops: &[String], text: &str) -> usize {
    text.char_indices()
        .map(|(i, _)| i)
        .find(|&i| {
            let tail = &text[i..];
            stops.iter().any(|s| s.starts_with(tail))
        })
        .unwrap_or(text.len())
}

/// Streams generated tokens as text, releasing each token id only together with its text.
///
/// Invariant: the text released so far is exactly the text of the token ids released so far
/// (whole tokens; only the final release after a stop string may end inside a token). So a
/// continuation that replays the released ids on a fresh `Detokenizer` (a migration to another
/// worker) starts on a clean boundary: no partial character, no partial stop string and no
/// held text is lost, and a stop string that spans the hand-over is still found, because the
/// tokens behind held text were never released and are generated again.
#[derive(Debug, Default)]
pub struct Detokenizer {
    stops: Vec<String>,
    utf8: Utf8Assembler,
    /// Tokens not released yet, oldest first.
    pending: Vec<PendingToken>,
    /// Complete characters of the pending tokens' bytes.
    text: String,
    stopped: bool,
}

#[derive(Debug)]
struct PendingToken {
    id: u32,
    /// `text.len()` after this token when its last byte ends a character; None when the token
    /// ends inside a character (a later token completes it).
    text_end: Option<usize>,
}

/// Text and the token ids behind it, safe to send now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Release {
    pub text: String,
    /// Exactly the tokens whose bytes `text` (with what was released before) wholly contains.
    pub token_ids: Vec<u32>,
    /// A stop string matched: generation ends, nothing after `text` is sent.
    pub stopped: bool,
}

impl Release {
    pub fn is_empty(&self) -> bool {
        self.text.is_empty() && self.token_ids.is_empty()
    }
}

impl Detokenizer {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Detokenizer {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Adds one generated token (`bytes` is its piece) and releases what is now safe to send:
    /// whole tokens whose text is complete UTF-8 and cannot become part of a stop string.
    /// After a stop string matched, further tokens release nothing.
    pub fn push(&mut self, id: u32, bytes: &[u8]) -> Release {
        if self.stopped {
            return Release {
                stopped: true,
                ..Default::default()
            };
        }
        let complete = self.utf8.push(bytes);
        self.text.push_str(&complete);
        let text_end = (!self.utf8.is_mid_character()).then_some(self.text.len());
        self.pending.push(PendingToken { id, text_end });
        if let Some(at) = first_stop(&self.stops, &self.text) {
            self.stopped = true;
            // Text before the stop goes out even when it ends inside a token: the stream ends.
            let mut release = self.release_through(at);
            let rest = at - release.text.len();
            release.text.push_str(&self.text[..rest]);
            release.stopped = true;
            self.pending.clear();
            self.text.clear();
            self.utf8 = Utf8Assembler::default();
            return release;
        }
        let hold = hold_from(&self.stops, &self.text);
        self.release_through(hold)
    }

    /// Releases the longest run of pending tokens whose text ends at or before `limit`, with
    /// exactly their text (`text` is cut at the end of the last released token).
    fn release_through(&mut self, limit: usize) -> Release {
        let Some((n, end)) = self
            .pending
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.text_end.map(|e| (i + 1, e)))
            .take_while(|&(_, e)| e <= limit)
            .last()
        else {
            return Release::default();
        };
        let token_ids = self.pending.drain(..n).map(|t| t.id).collect();
        for t in &mut self.pending {
            t.text_end = t.text_end.map(|e| e - end);
        }
        let text = self.text.drain(..end).collect();
        Release {
            text,
            token_ids,
            stopped: false,
        }
    }

    /// Releases everything still held at the end of generation (length limit or end of
    /// generation token): held text that never became a stop string, and an incomplete
    /// character as U+FFFD. Nothing after a stop string.
    pub fn finish(&mut self) -> Release {
        if self.stopped {
            return Release {
                stopped: true,
                ..Default::default()
            };
        }
        let mut text = std::mem::take(&mut self.text);
        text.push_str(&self.utf8.finish());
        let token_ids = self.pending.drain(..).map(|t| t.id).collect();
        Release {
            text,
            token_ids,
            stopped: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_characters_split_across_tokens() {
        let mut a = Utf8Assembler::default();
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(a.push(&euro[..1]), "");
        assert_eq!(a.push(&euro[1..2]), "");
        assert_eq!(a.push(&[euro[2], b'x']), "€x");
        assert_eq!(a.finish(), "");
    }

    #[test]
    fn replaces_invalid_bytes_and_flushes_incomplete_tail() {
        let mut a = Utf8Assembler::default();
        assert_eq!(a.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(a.push(&[0xe2, 0x82]), "");
        assert_eq!(a.finish(), "\u{fffd}");
    }

    /// A test tokenizer's output: (id, piece bytes).
    fn toks(pieces: &[&[u8]]) -> Vec<(u32, Vec<u8>)> {
        pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u32 + 100, p.to_vec()))
            .collect()
    }

    /// Generation without interruption: the text the client gets, and whether a stop matched.
    fn uninterrupted(stops: &[&str], tokens: &[(u32, Vec<u8>)]) -> (String, bool) {
        let mut d = Detokenizer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut text = String::new();
        for (id, bytes) in tokens {
            let r = d.push(*id, bytes);
            text.push_str(&r.text);
            if r.stopped {
                return (text, true);
            }
        }
        text.push_str(&d.finish().text);
        (text, false)
    }

    /// Generation that moves to a fresh worker after `cut` tokens: the new worker is given the
    /// released ids as its resume tokens and (greedy) generates the same tokens after them.
    fn handed_over(stops: &[&str], tokens: &[(u32, Vec<u8>)], cut: usize) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut first = Detokenizer::new(stops.clone());
        let mut text = String::new();
        let mut released: Vec<u32> = Vec::new();
        for (id, bytes) in &tokens[..cut] {
            let r = first.push(*id, bytes);
            text.push_str(&r.text);
            released.extend(&r.token_ids);
            if r.stopped {
                return (text, true);
            }
            // The released text is exactly the released tokens' text.
            let mut bytes_of_released = Vec::new();
            for id in &released {
                let (_, b) = tokens.iter().find(|(t, _)| t == id).expect("known id");
                bytes_of_released.extend_from_slice(b);
            }
            assert_eq!(text.as_bytes(), &bytes_of_released[..], "cut {cut}");
        }
        assert_eq!(
            &released[..],
            &tokens[..released.len()]
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>()[..]
        );
        let mut second = Detokenizer::new(stops);
        for (id, bytes) in &tokens[released.len()..] {
            let r = second.push(*id, bytes);
            text.push_str(&r.text);
            if r.stopped {
                return (text, true);
            }
        }
        text.push_str(&second.finish().text);
        (text, false)
    }

    fn assert_every_hand_over_is_exact(stops: &[&str], tokens: &[(u32, Vec<u8>)]) -> String {
        let (reference, stopped) = uninterrupted(stops, tokens);
        for cut in 0..=tokens.len() {
            assert_eq!(
                handed_over(stops, tokens, cut),
                (reference.clone(), stopped),
                "hand-over after {cut} tokens"
            );
        }
        reference
    }

    #[test]
    fn detokenizer_holds_a_character_split_over_two_tokens_with_its_ids() {
        let mut d = Detokenizer::new(vec![]);
        let e = "é".as_bytes();
        assert_eq!(
            d.push(1, b"caf"),
            Release {
                text: "caf".into(),
                token_ids: vec![1],
                stopped: false
            }
        );
        assert_eq!(d.push(2, &e[..1]), Release::default());
        assert_eq!(
            d.push(3, &[e[1], b'!']),
            Release {
                text: "é!".into(),
                token_ids: vec![2, 3],
                stopped: false
            }
        );
        assert!(d.finish().is_empty());
    }

    #[test]
    fn detokenizer_holds_a_character_split_over_three_tokens() {
        let mut d = Detokenizer::new(vec![]);
        let smile = "😀".as_bytes(); // 4 bytes
        assert_eq!(d.push(1, &smile[..1]), Release::default());
        assert_eq!(d.push(2, &smile[1..3]), Release::default());
        assert_eq!(
            d.push(3, &smile[3..]),
            Release {
                text: "😀".into(),
                token_ids: vec![1, 2, 3],
                stopped: false
            }
        );
    }

    #[test]
    fn detokenizer_finds_a_stop_string_spanning_tokens_and_releases_no_stop_ids() {
        let mut d = Detokenizer::new(vec!["\n\nUser:".into()]);
        assert_eq!(d.push(1, b"done.").token_ids, vec![1]);
        assert_eq!(d.push(2, b"\n"), Release::default());
        assert_eq!(d.push(3, b"\n"), Release::default());
        assert_eq!(d.push(4, b"User"), Release::default());
        assert_eq!(
            d.push(5, b": hi"),
            Release {
                text: "".into(),
                token_ids: vec![],
                stopped: true
            }
        );
        assert!(d.push(6, b"more").stopped);
        assert_eq!(d.finish().text, "");
    }

    #[test]
    fn detokenizer_releases_held_text_with_its_ids_when_it_is_no_stop() {
        let mut d = Detokenizer::new(vec!["\n\nUser:".into()]);
        // "done.\n" might continue as "\n\nUser:": the whole token waits.
        assert_eq!(d.push(1, b"done.\n"), Release::default());
        assert_eq!(
            d.push(2, b"Next"),
            Release {
                text: "done.\nNext".into(),
                token_ids: vec![1, 2],
                stopped: false
            }
        );
    }

    #[test]
    fn detokenizer_releases_whole_tokens_only() {
        // " E" might start "END": the whole token is held, not just "E".
        let mut d = Detokenizer::new(vec!["END".into()]);
        assert_eq!(d.push(1, b" E"), Release::default());
        assert_eq!(
            d.push(2, b"ND!"),
            Release {
                text: " ".into(),
                token_ids: vec![],
                stopped: true
            }
        );
        let mut d = Detokenizer::new(vec!["END".into()]);
        assert_eq!(d.push(1, b" E"), Release::default());
        assert_eq!(d.push(2, b"X").text, " EX");
    }

    #[test]
    fn detokenizer_finish_flushes_held_text_and_ids() {
        let mut d = Detokenizer::new(vec!["END".into()]);
        assert_eq!(d.push(1, b"a").text, "a");
        assert_eq!(d.push(2, b" E"), Release::default());
        assert_eq!(d.push(3, &[0xe2, 0x82]), Release::default());
        assert_eq!(
            d.finish(),
            Release {
                text: " E\u{fffd}".into(),
                token_ids: vec![2, 3],
                stopped: false
            }
        );
    }

    #[test]
    fn detokenizer_earliest_of_several_stops_wins() {
        let mut d = Detokenizer::new(vec!["b".into(), "a".into(), String::new()]);
        assert_eq!(
            d.push(1, b"xxab"),
            Release {
                text: "xx".into(),
                token_ids: vec![],
                stopped: true
            }
        );
    }

    #[test]
    fn detokenizer_without_stops_passes_whole_characters_through() {
        let mut d = Detokenizer::new(vec![]);
        assert_eq!(d.push(1, b"abc").text, "abc");
        assert_eq!(d.push(2, b"\n").token_ids, vec![2]);
    }

    #[test]
    fn detokenizer_replaces_invalid_bytes_without_holding_them() {
        let mut d = Detokenizer::new(vec![]);
        assert_eq!(
            d.push(1, &[b'a', 0xff]),
            Release {
                text: "a\u{fffd}".into(),
                token_ids: vec![1],
                stopped: false
            }
        );
    }

    #[test]
    fn hand_over_at_any_token_keeps_split_characters_exact() {
        let text = "Café «naïve» — 😀 日本";
        // Byte-fallback style: every byte its own token, so characters split over 2–4 tokens.
        let bytes: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        assert_eq!(assert_every_hand_over_is_exact(&[], &toks(&bytes)), text);
        // Uneven pieces that cut characters in other places.
        let b = text.as_bytes();
        let pieces: Vec<&[u8]> = vec![&b[..4], &b[4..6], &b[6..9], &b[9..20], &b[20..23], &b[23..]];
        assert_eq!(assert_every_hand_over_is_exact(&[], &toks(&pieces)), text);
    }

    #[test]
    fn hand_over_keeps_held_newlines_and_finds_a_stop_string_spanning_it() {
        let pieces: Vec<&[u8]> = vec![
            b"done", b".", b"\n", b"Next", b" line", b".\n", b"\n", b"User", b":", b" more",
        ];
        let text = assert_every_hand_over_is_exact(&["\n\nUser:"], &toks(&pieces));
        assert_eq!(text, "done.\nNext line.");
        // The stop string itself made of split multi-byte characters.
        let stop = "«fin»";
        let all = format!("voilà {stop} après");
        let bytes: Vec<&[u8]> = all.as_bytes().chunks(1).collect();
        assert_eq!(
            assert_every_hand_over_is_exact(&[stop], &toks(&bytes)),
            "voilà "
        );
        // Several stops, one a prefix of text that turns out not to stop.
        let pieces: Vec<&[u8]> = vec![b"a", b"\n", b"\nB", b"ob", b"\n\n", b"Us", b"er", b":"];
        assert_eq!(
            assert_every_hand_over_is_exact(&["\n\nUser:", "\nBob:"], &toks(&pieces)),
            "a\n\nBob"
        );
    }
}
