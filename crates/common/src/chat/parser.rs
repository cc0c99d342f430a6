//! One parser per response: a reasoning stage (harmony channels or `<think>`) and a tool-call
//! stage over the content it yields, chosen from the model's chat format.

use super::delta::ChatDelta;
use super::harmony::HarmonyParser;
use super::think::ThinkParser;
use super::tools::{ToolCallParser, ToolFormat};

/// How a model marks reasoning in its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningFormat {
    None,
    /// `<think>…</think>`; `starts_in_reasoning` when the generation prompt opened the block.
    Think {
        starts_in_reasoning: bool,
    },
    /// gpt-oss channels (tool calls included: harmony needs no tool stage).
    Harmony,
}

/// The output format of one model (and one request's generation prompt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatFormat {
    pub reasoning: ReasoningFormat,
    /// `None`: content is never parsed for tool calls (the request has no tools).
    pub tools: Option<ToolFormat>,
}

#[derive(Debug)]
enum Reasoning {
    None,
    Think(ThinkParser),
    Harmony(HarmonyParser),
}

#[derive(Debug)]
pub struct ChatParser {
    reasoning: Reasoning,
    tools: Option<ToolCallParser>,
    /// `parallel_tool_calls: false`: the reply ends after its first complete tool call.
    single_call: bool,
    /// The first call is complete and `single_call` is set: everything after it is dropped.
    cut: bool,
}

impl ChatParser {
    pub fn new(format: ChatFormat) -> Self {
        let reasoning = match format.reasoning {
            ReasoningFormat::None => Reasoning::None,
            ReasoningFormat::Think {
                starts_in_reasoning,
            } => Reasoning::Think(ThinkParser::new(starts_in_reasoning)),
            ReasoningFormat::Harmony => Reasoning::Harmony(HarmonyParser::default()),
        };
        let tools = match format.reasoning {
            ReasoningFormat::Harmony => None,
            _ => format.tools.map(ToolCallParser::new),
        };
        ChatParser {
            reasoning,
            tools,
            single_call: false,
            cut: false,
        }
    }

    /// At most one tool call (`parallel_tool_calls: false` with `tool_choice` auto): the reply is
    /// cut after its first complete call, dropping any text and calls that follow. Harmony needs
    /// no cut: `<|call|>` ends the reply after one call.
    pub fn single_call(mut self) -> Self {
        self.single_call = true;
        self
    }

    /// Whether the output format ended the answer (harmony `<|return|>` or `<|call|>`), or the
    /// answer was cut after its one tool call.
    pub fn ended(&self) -> bool {
        self.cut || matches!(&self.reasoning, Reasoning::Harmony(h) if h.ended())
    }

    /// Whether the reply was cut after its first tool call ([`Self::single_call`]).
    pub fn cut(&self) -> bool {
        self.cut
    }

    pub fn push(&mut self, text: &str) -> Vec<ChatDelta> {
        let first = match &mut self.reasoning {
            Reasoning::None => vec![ChatDelta::Content(text.to_string())],
            Reasoning::Think(p) => p.push(text),
            Reasoning::Harmony(p) => p.push(text),
        };
        self.tool_stage(first, false)
    }

    pub fn finish(&mut self) -> Vec<ChatDelta> {
        let first = match &mut self.reasoning {
            Reasoning::None => Vec::new(),
            Reasoning::Think(p) => p.finish(),
            Reasoning::Harmony(p) => p.finish(),
        };
        self.tool_stage(first, true)
    }

    fn tool_stage(&mut self, deltas: Vec<ChatDelta>, last: bool) -> Vec<ChatDelta> {
        let Some(tools) = &mut self.tools else {
            return deltas.into_iter().filter(|d| !is_empty(d)).collect();
        };
        let mut out = Vec::new();
        for d in deltas {
            match d {
                ChatDelta::Content(t) => out.extend(tools.push(&t)),
                other => out.push(other),
            }
        }
        if last {
            out.extend(tools.finish());
        }
        let mut kept = Vec::with_capacity(out.len());
        for d in out {
            if self.cut {
                break;
            }
            // Calls are emitted whole (name, then all of the arguments): the first call is
            // complete with its arguments.
            self.cut = self.single_call && matches!(d, ChatDelta::ToolCallArguments { .. });
            if !is_empty(&d) {
                kept.push(d);
            }
        }
        kept
    }
}

fn is_empty(d: &ChatDelta) -> bool {
    matches!(d, ChatDelta::Content(t) | ChatDelta::Reasoning(t) if t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ChatDelta::*;

    #[test]
    fn think_then_hermes_tool_call() {
        let mut p = ChatParser::new(ChatFormat {
            reasoning: ReasoningFormat::Think {
                starts_in_reasoning: false,
            },
            tools: Some(ToolFormat::Hermes),
        });
        let mut out =
            p.push("<think>need tool</think><tool_call>{\"name\":\"f\",\"arguments\":{}}");
        out.extend(p.push("</tool_call>"));
        out.extend(p.finish());
        assert_eq!(
            out,
            [
                Reasoning("need tool".into()),
                ToolCallBegin {
                    index: 0,
                    name: "f".into()
                },
                ToolCallArguments {
                    index: 0,
                    text: "{}".into()
                },
            ]
        );
    }

    fn hermes_single_call() -> ChatParser {
        ChatParser::new(ChatFormat {
            reasoning: ReasoningFormat::None,
            tools: Some(ToolFormat::Hermes),
        })
        .single_call()
    }

    const TWO_CALLS: &str = "Checking.<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":1}}</tool_call> and <tool_call>{\"name\":\"g\",\"arguments\":{}}</tool_call> done";

    fn first_call_only() -> Vec<ChatDelta> {
        vec![
            Content("Checking.".into()),
            ToolCallBegin {
                index: 0,
                name: "f".into(),
            },
            ToolCallArguments {
                index: 0,
                text: "{\"a\":1}".into(),
            },
        ]
    }

    #[test]
    fn single_call_cuts_the_reply_after_the_first_complete_call() {
        let mut p = hermes_single_call();
        let mut out = p.push(TWO_CALLS);
        assert!(p.cut() && p.ended());
        out.extend(p.push("more text<tool_call>"));
        out.extend(p.finish());
        assert_eq!(out, first_call_only());
        // Without the switch both calls and the text between them come through.
        let mut p = ChatParser::new(ChatFormat {
            reasoning: ReasoningFormat::None,
            tools: Some(ToolFormat::Hermes),
        });
        let mut all = p.push(TWO_CALLS);
        all.extend(p.finish());
        assert_eq!(all.len(), 7, "{all:?}");
        assert!(!p.cut());
    }

    #[test]
    fn single_call_gives_the_same_result_however_the_stream_is_cut() {
        for at in (1..TWO_CALLS.len()).filter(|&i| TWO_CALLS.is_char_boundary(i)) {
            let mut p = hermes_single_call();
            let (a, b) = TWO_CALLS.split_at(at);
            let mut out = p.push(a);
            out.extend(p.push(b));
            out.extend(p.finish());
            // Content pieces may come in several deltas: merge them to compare.
            let mut merged: Vec<ChatDelta> = Vec::new();
            for d in out {
                match (merged.last_mut(), d) {
                    (Some(Content(s)), Content(t)) => s.push_str(&t),
                    (_, d) => merged.push(d),
                }
            }
            assert_eq!(merged, first_call_only(), "cut at {at}");
        }
    }

    #[test]
    fn single_call_leaves_a_reply_without_calls_alone() {
        let mut p = hermes_single_call();
        let mut out = p.push("Just text.");
        out.extend(p.finish());
        assert_eq!(out, [Content("Just text.".into())]);
        assert!(!p.cut());
    }

    #[test]
    fn plain_format_passes_text_through() {
        let mut p = ChatParser::new(ChatFormat {
            reasoning: ReasoningFormat::None,
            tools: None,
        });
        assert_eq!(p.push("<think>x"), [Content("<think>x".into())]);
        assert!(p.finish().is_empty());
        assert!(!p.ended());
    }

    #[test]
    fn harmony_format_reports_the_end() {
        let mut p = ChatParser::new(ChatFormat {
            reasoning: ReasoningFormat::Harmony,
            tools: Some(ToolFormat::Hermes),
        });
        p.push("<|channel|>final<|message|>ok<|return|>");
        assert!(p.ended());
    }
}
