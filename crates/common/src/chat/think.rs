//! `<think>…</think>` reasoning (Qwen3, DeepSeek-R1, SmolLM3 and others): text between the tags is
//! reasoning, the rest content. Templates that open the think block in the generation prompt make
//! the output start inside it: [`ThinkParser::new`] takes that as `starts_in_reasoning`.

use super::delta::{ChatDelta, Step, Toggle, push_text};

pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

#[derive(Debug)]
pub struct ThinkParser {
    /// Inside the think block: reasoning.
    text: Toggle,
    /// Leading whitespace after `</think>` is dropped (templates put "\n\n" there).
    trim_next: bool,
}

impl ThinkParser {
    pub fn new(starts_in_reasoning: bool) -> Self {
        ThinkParser {
            text: Toggle::new(OPEN, CLOSE, starts_in_reasoning),
            trim_next: false,
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<ChatDelta> {
        let mut out = Vec::new();
        self.text.held.push_str(text);
        loop {
            if self.trim_next {
                let held = &mut self.text.held;
                let trimmed = held.trim_start().len();
                held.drain(..held.len() - trimmed);
                if held.is_empty() {
                    return out;
                }
                self.trim_next = false;
            }
            match self.text.next(true) {
                Step::Span { inside, text } => {
                    push_text(&mut out, inside, &text);
                    // After `</think>`.
                    self.trim_next = inside;
                }
                Step::Rest { inside, text } => {
                    push_text(&mut out, inside, &text);
                    return out;
                }
            }
        }
    }

    pub fn finish(&mut self) -> Vec<ChatDelta> {
        let mut out = Vec::new();
        push_text(
            &mut out,
            self.text.inside,
            &std::mem::take(&mut self.text.held),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChatDelta::*;

    fn run(starts_in_reasoning: bool, parts: &[&str]) -> Vec<ChatDelta> {
        let mut p = ThinkParser::new(starts_in_reasoning);
        let mut out = Vec::new();
        let mut all: Vec<ChatDelta> = parts.iter().flat_map(|t| p.push(t)).collect();
        all.extend(p.finish());
        for d in all {
            match d {
                Content(t) => push_text(&mut out, false, &t),
                Reasoning(t) => push_text(&mut out, true, &t),
                other => out.push(other),
            }
        }
        out
    }

    #[test]
    fn think_block_is_reasoning_and_the_rest_content() {
        let out = run(false, &["<think>2+2 is 4.</think>\n\nIt is 4."]);
        assert_eq!(
            out,
            [Reasoning("2+2 is 4.".into()), Content("It is 4.".into())]
        );
    }

    #[test]
    fn think_opened_by_the_template_starts_in_reasoning() {
        let out = run(true, &["hmm</think>Yes."]);
        assert_eq!(out, [Reasoning("hmm".into()), Content("Yes.".into())]);
    }

    #[test]
    fn think_stream_cut_inside_a_marker_gives_the_same_result() {
        let text = "<think>a<b</think>\n c </thin";
        let whole = run(false, &[text]);
        assert_eq!(whole, [Reasoning("a<b".into()), Content("c </thin".into())]);
        for cut in 1..text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(run(false, &[a, b]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn no_think_block_is_all_content() {
        assert_eq!(
            run(false, &["plain ", "<thi", "s"]),
            [Content("plain <this".into())]
        );
    }
}
