//! gpt-oss "harmony" output: `<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>
//! final<|message|>…<|return|>`, and tool calls as commentary messages addressed to a function
//! (`<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{…}<|call|>`).
//! `analysis` becomes reasoning, `final` (and recipient-less commentary, the user-visible preamble)
//! content, and a message to `functions.NAME` a tool call whose body is the arguments.
//! The text must carry the special tokens (detokenised with special tokens rendered).

use super::delta::{ChatDelta, find_first, push_text, safe_len};

pub const START: &str = "<|start|>";
pub const CHANNEL: &str = "<|channel|>";
pub const MESSAGE: &str = "<|message|>";
pub const END: &str = "<|end|>";
/// Ends generation: the final answer is complete.
pub const RETURN: &str = "<|return|>";
/// Ends generation: the model waits for a tool result.
pub const CALL: &str = "<|call|>";
const BODY_ENDS: [&str; 3] = [END, RETURN, CALL];
/// A header longer than this is not a header: the model is writing plain text.
const MAX_HEADER_BYTES: usize = 512;

#[derive(Debug)]
enum State {
    /// Collecting a message header up to `<|message|>`.
    Header(String),
    /// Inside a message body; `held` may still turn into an end marker.
    Body { kind: Body, held: String },
    /// `<|return|>` or `<|call|>` was seen: nothing more is part of the answer.
    Ended,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Body {
    Content,
    Reasoning,
    Tool(u32),
}

/// Incremental harmony parser: push text as it streams, in any cuts.
#[derive(Debug)]
pub struct HarmonyParser {
    state: State,
    calls: u32,
}

impl Default for HarmonyParser {
    /// A parser for output that follows a generation prompt ending in `<|start|>assistant`.
    fn default() -> Self {
        HarmonyParser {
            state: State::Header(String::new()),
            calls: 0,
        }
    }
}

impl HarmonyParser {
    /// Whether `<|return|>` or `<|call|>` ended the answer.
    pub fn ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    pub fn push(&mut self, text: &str) -> Vec<ChatDelta> {
        let mut out = Vec::new();
        let mut input = text.to_string();
        loop {
            match &mut self.state {
                State::Ended => return out,
                State::Header(buf) => {
                    buf.push_str(&input);
                    input.clear();
                    let Some(at) = buf.find(MESSAGE) else {
                        let t = buf.trim_start();
                        let plain = !(t.starts_with("<|") || "<|".starts_with(t));
                        if plain || buf.len() > MAX_HEADER_BYTES {
                            // Not harmony: pass the text through as content.
                            input = std::mem::take(buf);
                            self.state = State::Body {
                                kind: Body::Content,
                                held: String::new(),
                            };
                            continue;
                        }
                        return out;
                    };
                    let header = buf[..at].to_string();
                    input = buf[at + MESSAGE.len()..].to_string();
                    let kind = self.body_kind(&header, &mut out);
                    self.state = State::Body {
                        kind,
                        held: String::new(),
                    };
                }
                State::Body { kind, held } => {
                    held.push_str(&input);
                    input.clear();
                    let kind = *kind;
                    match find_first(held, &BODY_ENDS) {
                        Some((at, marker)) => {
                            let body = held[..at].to_string();
                            let rest = held[at + marker.len()..].to_string();
                            emit(&mut out, kind, &body);
                            if marker == END {
                                self.state = State::Header(String::new());
                                input = rest;
                            } else {
                                self.state = State::Ended;
                            }
                        }
                        None => {
                            let n = safe_len(held, &BODY_ENDS);
                            let body: String = held.drain(..n).collect();
                            emit(&mut out, kind, &body);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Releases what is held back at the end of the stream (an unterminated marker is text).
    pub fn finish(&mut self) -> Vec<ChatDelta> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.state, State::Ended) {
            State::Body { kind, held } => emit(&mut out, kind, &held),
            State::Header(buf) if !buf.trim().is_empty() => push_text(&mut out, false, &buf),
            _ => {}
        }
        out
    }

    fn body_kind(&mut self, header: &str, out: &mut Vec<ChatDelta>) -> Body {
        let (channel, recipient) = parse_header(header);
        if let Some(name) = recipient
            .as_deref()
            .and_then(|r| r.strip_prefix("functions."))
        {
            let index = self.calls;
            self.calls += 1;
            out.push(ChatDelta::ToolCallBegin {
                index,
                name: name.to_string(),
            });
            return Body::Tool(index);
        }
        match channel.as_deref() {
            Some("analysis") => Body::Reasoning,
            _ => Body::Content,
        }
    }
}

fn emit(out: &mut Vec<ChatDelta>, kind: Body, text: &str) {
    match kind {
        Body::Content => push_text(out, false, text),
        Body::Reasoning => push_text(out, true, text),
        Body::Tool(index) if !text.is_empty() => out.push(ChatDelta::ToolCallArguments {
            index,
            text: text.to_string(),
        }),
        Body::Tool(_) => {}
    }
}

/// (channel, recipient) of a header such as `<|start|>assistant<|channel|>commentary
/// to=functions.f <|constrain|>json` (the recipient may also stand before the channel).
fn parse_header(header: &str) -> (Option<String>, Option<String>) {
    let word = |s: &str| -> String {
        s.split(|c: char| c.is_whitespace() || c == '<')
            .next()
            .unwrap_or("")
            .to_string()
    };
    let channel = header
        .find(CHANNEL)
        .map(|at| word(header[at + CHANNEL.len()..].trim_start()))
        .filter(|c| !c.is_empty());
    let recipient = header
        .find("to=")
        .map(|at| word(&header[at + 3..]))
        .filter(|r| !r.is_empty());
    (channel, recipient)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChatDelta::*;

    const ANSWER: &str = "<|channel|>analysis<|message|>User asks capital. Simple.<|end|>\
        <|start|>assistant<|channel|>final<|message|>Paris.<|return|>";

    fn run(parts: &[&str]) -> (Vec<ChatDelta>, bool) {
        let mut p = HarmonyParser::default();
        let mut out = Vec::new();
        for part in parts {
            for d in p.push(part) {
                merge(&mut out, d);
            }
        }
        let ended = p.ended();
        for d in p.finish() {
            merge(&mut out, d);
        }
        (out, ended)
    }

    fn merge(out: &mut Vec<ChatDelta>, d: ChatDelta) {
        match d {
            Content(t) => push_text(out, false, &t),
            Reasoning(t) => push_text(out, true, &t),
            ToolCallArguments { index, text } => match out.last_mut() {
                Some(ToolCallArguments { index: i, text: s }) if *i == index => s.push_str(&text),
                _ => out.push(ToolCallArguments { index, text }),
            },
            other => out.push(other),
        }
    }

    #[test]
    fn harmony_analysis_is_reasoning_and_final_is_content() {
        let (out, ended) = run(&[ANSWER]);
        assert_eq!(
            out,
            [
                Reasoning("User asks capital. Simple.".into()),
                Content("Paris.".into())
            ]
        );
        assert!(ended);
    }

    #[test]
    fn harmony_stream_cut_inside_every_marker_gives_the_same_result() {
        let whole = run(&[ANSWER]).0;
        for cut in 1..ANSWER.len() {
            if !ANSWER.is_char_boundary(cut) {
                continue;
            }
            let (a, b) = ANSWER.split_at(cut);
            assert_eq!(run(&[a, b]).0, whole, "cut at {cut}: {a:?} | {b:?}");
        }
        let chars: Vec<String> = ANSWER.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(&refs).0, whole, "one character at a time");
    }

    #[test]
    fn harmony_commentary_to_a_function_is_a_tool_call_and_call_ends_the_answer() {
        let text = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant\
            <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>\
            {\"city\":\"Paris\"}<|call|>ignored";
        let (out, ended) = run(&[text]);
        assert_eq!(
            out,
            [
                Reasoning("Need weather.".into()),
                ToolCallBegin {
                    index: 0,
                    name: "get_weather".into()
                },
                ToolCallArguments {
                    index: 0,
                    text: "{\"city\":\"Paris\"}".into()
                },
            ]
        );
        assert!(ended);
    }

    #[test]
    fn harmony_recipient_before_the_channel_is_understood() {
        let text =
            "<|start|>assistant to=functions.f<|channel|>commentary json<|message|>{}<|call|>";
        let (out, _) = run(&[text]);
        assert_eq!(
            out[0],
            ToolCallBegin {
                index: 0,
                name: "f".into()
            }
        );
    }

    #[test]
    fn harmony_commentary_without_recipient_is_content() {
        let (out, _) = run(&["<|channel|>commentary<|message|>Checking…<|end|>"]);
        assert_eq!(out, [Content("Checking…".into())]);
    }

    #[test]
    fn harmony_plain_text_passes_through_as_content() {
        let (out, ended) = run(&["Hello", " world"]);
        assert_eq!(out, [Content("Hello world".into())]);
        assert!(!ended);
    }

    #[test]
    fn harmony_unterminated_body_is_released_at_finish() {
        let (out, ended) = run(&["<|channel|>final<|message|>Par", "is <|re"]);
        assert_eq!(out, [Content("Paris <|re".into())]);
        assert!(!ended);
    }
}
