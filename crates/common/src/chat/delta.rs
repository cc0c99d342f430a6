//! What the chat parsers produce, and the hold-back rule they share for markers cut across pushes.

/// One piece of parsed model output, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatDelta {
    /// Text for the user (OpenAI `content`).
    Content(String),
    /// Reasoning text (OpenAI-style `reasoning_content`): harmony `analysis`, `<think>…</think>`.
    Reasoning(String),
    /// A tool call starts: its position among this response's calls and the function's name.
    ToolCallBegin { index: u32, name: String },
    /// More of the arguments (JSON text) of the call `index`.
    ToolCallArguments { index: u32, text: String },
}

/// Appends `text` as content or reasoning, merging with the previous delta of the same kind.
pub(crate) fn push_text(out: &mut Vec<ChatDelta>, reasoning: bool, text: &str) {
    if text.is_empty() {
        return;
    }
    match (out.last_mut(), reasoning) {
        (Some(ChatDelta::Content(s)), false) | (Some(ChatDelta::Reasoning(s)), true) => {
            s.push_str(text)
        }
        _ => out.push(if reasoning {
            ChatDelta::Reasoning(text.to_string())
        } else {
            ChatDelta::Content(text.to_string())
        }),
    }
}

/// Where `text` must be cut so that nothing that may still become one of `markers` is released:
/// the start of the longest suffix of `text` that is a proper prefix of a marker (`text.len()`
/// when there is none). Always a character boundary.
pub(crate) fn safe_len(text: &str, markers: &[&str]) -> usize {
    text.char_indices()
        .map(|(i, _)| i)
        .find(|&i| {
            let tail = &text[i..];
            markers
                .iter()
                .any(|m| m.len() > tail.len() && m.starts_with(tail))
        })
        .unwrap_or(text.len())
}

/// Text that alternates between two sides, outside and inside, switched by an opening and a
/// closing marker (`<think>`…`</think>`, `<tool_call>`…`</tool_call>`), fed in pieces cut
/// anywhere, inside a marker too. The scanning loop of the think and tool-call parsers.
#[derive(Debug)]
pub(crate) struct Toggle {
    open: &'static str,
    close: &'static str,
    /// Between the markers now.
    pub inside: bool,
    /// Text not taken yet.
    pub held: String,
}

/// One step of [`Toggle::next`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The text of one side up to its marker, which was consumed: the side has flipped.
    Span { inside: bool, text: String },
    /// No marker in view: what may be released now (nothing when the side holds its text), the
    /// possible start of a marker stays held. The end of what can be taken for now.
    Rest { inside: bool, text: String },
}

impl Toggle {
    pub fn new(open: &'static str, close: &'static str, inside: bool) -> Self {
        Toggle {
            open,
            close,
            inside,
            held: String::new(),
        }
    }

    /// Takes the next span of held text. `release_inside`: whether text inside is released before
    /// its closing marker shows (reasoning streams; a tool call is parsed whole).
    pub fn next(&mut self, release_inside: bool) -> Step {
        let inside = self.inside;
        let marker = if inside { self.close } else { self.open };
        match find_first(&self.held, &[marker]) {
            Some((at, _)) => {
                let text = self.held[..at].to_string();
                self.held.drain(..at + marker.len());
                self.inside = !inside;
                Step::Span { inside, text }
            }
            None => {
                let n = if inside && !release_inside {
                    0
                } else {
                    safe_len(&self.held, &[marker])
                };
                Step::Rest {
                    inside,
                    text: self.held.drain(..n).collect(),
                }
            }
        }
    }
}

/// The first occurrence of any of `markers` in `text`: (position, marker).
pub(crate) fn find_first<'m>(text: &str, markers: &[&'m str]) -> Option<(usize, &'m str)> {
    markers
        .iter()
        .filter_map(|m| text.find(m).map(|at| (at, *m)))
        .min_by_key(|(at, m)| (*at, usize::MAX - m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_only_a_possible_marker_prefix() {
        assert_eq!(safe_len("hello <|e", &["<|end|>"]), 6);
        assert_eq!(safe_len("hello <|end", &["<|end|>", "<|return|>"]), 6);
        assert_eq!(safe_len("hello <", &["<think>"]), 6);
        assert_eq!(safe_len("hello", &["<think>"]), 5);
        assert_eq!(safe_len("a<b", &["<think>"]), 3);
        assert_eq!(safe_len("é<", &["<x>"]), "é".len());
    }

    #[test]
    fn earliest_marker_wins_and_longer_wins_a_tie() {
        assert_eq!(
            find_first("ab<|end|>c<|call|>", &["<|call|>", "<|end|>"]),
            Some((2, "<|end|>"))
        );
        assert_eq!(find_first("x", &["<|end|>"]), None);
    }

    #[test]
    fn toggle_takes_spans_up_to_each_marker_and_holds_a_cut_marker() {
        let mut t = Toggle::new("<a>", "</a>", false);
        t.held.push_str("x<a>y</a");
        assert_eq!(
            t.next(false),
            Step::Span {
                inside: false,
                text: "x".into()
            }
        );
        assert!(t.inside);
        assert_eq!(
            t.next(false),
            Step::Rest {
                inside: true,
                text: String::new()
            },
            "inside text is held until its marker"
        );
        assert_eq!(
            t.next(true),
            Step::Rest {
                inside: true,
                text: "y".into()
            },
            "released, all but the cut marker"
        );
        t.held.push('>');
        assert_eq!(
            t.next(true),
            Step::Span {
                inside: true,
                text: String::new()
            }
        );
        assert!(!t.inside && t.held.is_empty());
    }

    #[test]
    fn text_of_one_kind_merges() {
        let mut out = Vec::new();
        push_text(&mut out, false, "a");
        push_text(&mut out, false, "b");
        push_text(&mut out, true, "c");
        push_text(&mut out, false, "");
        assert_eq!(
            out,
            [
                ChatDelta::Content("ab".into()),
                ChatDelta::Reasoning("c".into())
            ]
        );
    }
}
