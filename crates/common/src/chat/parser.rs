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
        ChatParser { reasoning, tools }
    }

    /// Whether the output format ended the answer (harmony `<|return|>` or `<|call|>`).
    pub fn ended(&self) -> bool {
        matches!(&self.reasoning, Reasoning::Harmony(h) if h.ended())
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
        out.into_iter().filter(|d| !is_empty(d)).collect()
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
