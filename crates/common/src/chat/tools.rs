//! Tool calls written as JSON in the model's text: Hermes/Qwen `<tool_call>{"name": …,
//! "arguments": {…}}</tool_call>` (any number, with content around them) and Llama-3's bare JSON
//! answer `{"name": …, "parameters": {…}}` (optionally after `<|python_tag|>`, several separated
//! by `;`). A block that does not parse as a call is passed through as content, never dropped.

use serde_json::Value;

use super::delta::{ChatDelta, Step, Toggle, push_text};

pub const HERMES_OPEN: &str = "<tool_call>";
pub const HERMES_CLOSE: &str = "</tool_call>";
pub const PYTHON_TAG: &str = "<|python_tag|>";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{json}</tool_call>` (Hermes, Qwen 2.5/3, SmolLM3 and many fine-tunes).
    Hermes,
    /// The whole answer is a JSON call (Llama 3.1+ JSON tool calling).
    Llama3Json,
}

#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    /// Hermes: `inside` is inside `<tool_call>`; Llama-3: the answer is JSON.
    text: Toggle,
    /// Llama-3: whether the first non-blank text decided the mode yet.
    decided: bool,
    calls: u32,
}

impl ToolCallParser {
    pub fn new(format: ToolFormat) -> Self {
        ToolCallParser {
            format,
            text: Toggle::new(HERMES_OPEN, HERMES_CLOSE, false),
            decided: false,
            calls: 0,
        }
    }

    pub fn push(&mut self, text: &str) -> Vec<ChatDelta> {
        self.text.held.push_str(text);
        let mut out = Vec::new();
        match self.format {
            ToolFormat::Hermes => self.hermes(&mut out),
            ToolFormat::Llama3Json => self.llama3(&mut out),
        }
        out
    }

    pub fn finish(&mut self) -> Vec<ChatDelta> {
        let mut out = Vec::new();
        let held = std::mem::take(&mut self.text.held);
        if !self.text.inside {
            push_text(&mut out, false, &held);
        } else if !self.emit_calls(&mut out, &held) {
            // An unterminated or malformed call stays visible as text.
            let open = match self.format {
                ToolFormat::Hermes => HERMES_OPEN,
                ToolFormat::Llama3Json => "",
            };
            push_text(&mut out, false, &format!("{open}{held}"));
        }
        self.text.inside = false;
        out
    }

    fn hermes(&mut self, out: &mut Vec<ChatDelta>) {
        loop {
            match self.text.next(false) {
                Step::Span {
                    inside: false,
                    text,
                } => push_text(out, false, &text),
                Step::Span { inside: true, text } => {
                    if !self.emit_calls(out, &text) {
                        push_text(out, false, &format!("{HERMES_OPEN}{text}{HERMES_CLOSE}"));
                    }
                }
                Step::Rest { text, .. } => {
                    push_text(out, false, &text);
                    return;
                }
            }
        }
    }

    fn llama3(&mut self, out: &mut Vec<ChatDelta>) {
        if !self.decided {
            let t = self.text.held.trim_start();
            if t.is_empty() || PYTHON_TAG.starts_with(t) {
                return;
            }
            self.decided = true;
            if let Some(rest) = t.strip_prefix(PYTHON_TAG) {
                self.text.held = rest.to_string();
                self.text.inside = true;
            } else {
                self.text.inside = t.starts_with('{');
            }
        }
        if !self.text.inside {
            push_text(out, false, &std::mem::take(&mut self.text.held));
        }
        // JSON answers are parsed whole at `finish`.
    }

    /// Emits the calls in `body` (one JSON object, or several separated by `;` or newlines);
    /// false, emitting nothing, when it is not a list of calls.
    fn emit_calls(&mut self, out: &mut Vec<ChatDelta>, body: &str) -> bool {
        let mut calls = Vec::new();
        let mut rest = body;
        loop {
            rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
            if rest.is_empty() {
                break;
            }
            let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
            let Some(Ok(v)) = values.next() else {
                return false;
            };
            let Some(call) = parse_call(&v) else {
                return false;
            };
            calls.push(call);
            rest = &rest[values.byte_offset()..];
        }
        if calls.is_empty() {
            return false;
        }
        for (name, arguments) in calls {
            let index = self.calls;
            self.calls += 1;
            out.push(ChatDelta::ToolCallBegin { index, name });
            out.push(ChatDelta::ToolCallArguments {
                index,
                text: arguments,
            });
        }
        true
    }
}

/// (name, arguments JSON text) of `{"name": …, "arguments"|"parameters": {…} or "…"}`.
fn parse_call(v: &Value) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(_) => return None,
    };
    Some((name, args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChatDelta::*;

    fn run(format: ToolFormat, parts: &[&str]) -> Vec<ChatDelta> {
        let mut p = ToolCallParser::new(format);
        let mut out = Vec::new();
        let mut all: Vec<ChatDelta> = parts.iter().flat_map(|t| p.push(t)).collect();
        all.extend(p.finish());
        for d in all {
            match d {
                Content(t) => push_text(&mut out, false, &t),
                other => out.push(other),
            }
        }
        out
    }

    fn call(index: u32, name: &str, args: &str) -> [ChatDelta; 2] {
        [
            ToolCallBegin {
                index,
                name: name.into(),
            },
            ToolCallArguments {
                index,
                text: args.into(),
            },
        ]
    }

    #[test]
    fn hermes_calls_are_parsed_and_surrounding_text_is_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>";
        let mut want = vec![Content("Let me check.\n".into())];
        want.extend(call(0, "get_weather", "{\"city\":\"Paris\"}"));
        want.push(Content("\n".into()));
        want.extend(call(1, "now", "{}"));
        assert_eq!(run(ToolFormat::Hermes, &[text]), want);
    }

    #[test]
    fn hermes_stream_cut_inside_a_marker_gives_the_same_result() {
        let text = "a<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}</tool_call>b";
        let whole = run(ToolFormat::Hermes, &[text]);
        assert_eq!(whole.len(), 4);
        for cut in 1..text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(run(ToolFormat::Hermes, &[a, b]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn hermes_malformed_or_unterminated_calls_stay_visible_as_text() {
        assert_eq!(
            run(ToolFormat::Hermes, &["<tool_call>not json</tool_call>"]),
            [Content("<tool_call>not json</tool_call>".into())]
        );
        assert_eq!(
            run(ToolFormat::Hermes, &["<tool_call>{\"name\": \"f\""]),
            [Content("<tool_call>{\"name\": \"f\"".into())]
        );
        let mut want = vec![];
        want.extend(call(0, "f", "{}"));
        assert_eq!(
            run(ToolFormat::Hermes, &["<tool_call>{\"name\": \"f\"}"]),
            want
        );
    }

    #[test]
    fn llama3_json_answer_is_a_call_and_text_is_content() {
        let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        let mut want = vec![];
        want.extend(call(0, "get_weather", "{\"city\":\"Paris\"}"));
        assert_eq!(
            run(ToolFormat::Llama3Json, &[" ", "{\"na", &text[4..]]),
            want
        );
        let tagged = format!("<|python_tag|>{text}; {{\"name\": \"now\", \"parameters\": {{}}}}");
        let (a, b) = tagged.split_at(5);
        let got = run(ToolFormat::Llama3Json, &[a, b]);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(
            run(ToolFormat::Llama3Json, &["Paris", " is the capital."]),
            [Content("Paris is the capital.".into())]
        );
    }
}
