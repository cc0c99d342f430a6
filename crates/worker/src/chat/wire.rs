//! `moe.v1` chat requests into the engine's [`ChatJob`], and the engine's reply back into
//! `GenerateResponse` fields: a [`ReplyShaper`] runs the reply parser (harmony channels,
//! `<think>`, tool calls) over the streamed text, off the engine thread.

use moe_common::chat::{ChatDelta, ChatFormat, ChatParser};
use moe_common::pb::v1::ToolCallDelta;
use moe_common::pb::v1::response_format::Type as FormatType;
use moe_common::pb::v1::tool_choice::Mode as ToolMode;
use moe_common::pb::{FinishReason, GenerateRequest, GenerateResponse};
use serde_json::Value as Json;

use super::prompt::{OutputFormat, ToolChoice};
use super::template::{Message, ToolCall};

/// A chat request as the engine renders it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatJob {
    pub messages: Vec<Message>,
    pub tools: Vec<Json>,
    pub tool_choice: ToolChoice,
    pub output: OutputFormat,
    pub reasoning_effort: Option<String>,
    /// Special tokens rendered, nothing parsed.
    pub raw_output: bool,
    /// `parallel_tool_calls: false`: at most one tool call (see [`ChatReply::single_tool_call`]).
    pub single_tool_call: bool,
}

/// How the engine tells the service to read a chat reply (sent before any text).
#[derive(Clone, Debug, PartialEq)]
pub struct ChatReply {
    pub format: ChatFormat,
    /// Prompt text after the generation prompt that the parser must read first.
    pub prefill: String,
    pub raw_output: bool,
    /// At most one tool call: the reply is cut after its first complete call
    /// ([`ChatParser::single_call`]). Forced calls are one call by grammar already.
    pub single_tool_call: bool,
    /// After a migration: the text of the tokens the previous worker generated (its client
    /// already has what they meant). The parser reads it, emitting nothing, so that it resumes
    /// in the right state (inside reasoning, a tool call, …). The engine sets it.
    pub resumed: String,
}

impl ChatReply {
    /// Whether the reply's text is detokenized with special tokens rendered: raw output shows
    /// them, and the harmony parser reads its channel markers.
    pub fn renders_special(&self) -> bool {
        self.raw_output || self.format.reasoning == moe_common::chat::ReasoningFormat::Harmony
    }
}

/// What the engine needs to run a chat job.
#[derive(Debug)]
pub struct EnginePrompt {
    pub tokens: Vec<u32>,
    /// GBNF for the generated text.
    pub grammar: Option<String>,
    /// Detokenize with special tokens rendered (the reply parser reads harmony markers).
    pub render_special: bool,
    /// For the service's [`ReplyShaper`].
    pub reply: ChatReply,
}

/// Renders `chat` with the model's template (`template_source`, with its BOS and EOS text).
pub fn engine_prompt(
    chat: &ChatJob,
    template_source: &str,
    bos: &str,
    eos: &str,
    tok: &dyn super::Tokenize,
) -> Result<EnginePrompt, super::TemplateError> {
    let template = super::ChatTemplate::new(template_source, bos, eos)?;
    let p = super::build_prompt(
        &template,
        tok,
        &super::ChatRequest {
            messages: &chat.messages,
            tools: &chat.tools,
            tool_choice: chat.tool_choice.clone(),
            output: chat.output.clone(),
            reasoning_effort: chat.reasoning_effort.as_deref(),
        },
    )?;
    let reply = ChatReply {
        format: p.format,
        prefill: p.prefill,
        raw_output: chat.raw_output,
        single_tool_call: chat.single_tool_call,
        resumed: String::new(),
    };
    Ok(EnginePrompt {
        tokens: p.tokens,
        grammar: p.grammar,
        render_special: reply.renders_special(),
        reply,
    })
}

/// The text of `resume_ids` (a migrated request's earlier tokens) as the engine detokenizes
/// this reply (special tokens rendered for harmony and raw output), for [`ChatReply::resumed`].
pub fn resumed_text(
    reply: &ChatReply,
    resume_ids: &[u32],
    token_bytes: impl Fn(u32, bool) -> Vec<u8>,
) -> String {
    let special = reply.renders_special();
    let bytes: Vec<u8> = resume_ids
        .iter()
        .flat_map(|&t| token_bytes(t, special))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The chat part of a validated request; `Err` names the field at fault.
pub fn chat_job(req: &GenerateRequest) -> Result<ChatJob, String> {
    let messages = req
        .messages
        .iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
            name: Some(m.name.clone()).filter(|n| !n.is_empty()),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| ToolCall {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    arguments: c.arguments.clone(),
                })
                .collect(),
            tool_call_id: Some(m.tool_call_id.clone()).filter(|n| !n.is_empty()),
            reasoning_content: Some(m.reasoning_content.clone()).filter(|n| !n.is_empty()),
        })
        .collect();
    let tools = if req.tools_json.is_empty() {
        Vec::new()
    } else {
        match serde_json::from_str::<Json>(&req.tools_json) {
            Ok(Json::Array(a)) => a,
            _ => return Err("tools_json must be a JSON array of tool objects".into()),
        }
    };
    let tool_choice = match &req.tool_choice {
        None => ToolChoice::Auto,
        Some(c) => match c.mode() {
            ToolMode::Auto => ToolChoice::Auto,
            ToolMode::None => ToolChoice::None,
            ToolMode::Required => ToolChoice::Required,
            ToolMode::Function => ToolChoice::Function(c.function_name.clone()),
        },
    };
    let output = match &req.response_format {
        None => OutputFormat::Text,
        Some(f) => match f.r#type() {
            FormatType::Text => OutputFormat::Text,
            FormatType::JsonObject => OutputFormat::JsonObject,
            FormatType::JsonSchema => OutputFormat::JsonSchema(
                serde_json::from_str(&f.json_schema)
                    .map_err(|e| format!("response_format.json_schema is not JSON: {e}"))?,
            ),
        },
    };
    Ok(ChatJob {
        messages,
        tools,
        tool_choice,
        output,
        reasoning_effort: Some(req.reasoning_effort.clone()).filter(|r| !r.is_empty()),
        raw_output: req.raw_output,
        single_tool_call: req.parallel_tool_calls == Some(false),
    })
}

/// Turns streamed reply text into response fields. Without a [`ChatReply`] (completions) text
/// passes through.
#[derive(Debug, Default)]
pub struct ReplyShaper {
    parser: Option<ChatParser>,
    calls: u32,
    /// Tool-call ids are made from the request id.
    id_prefix: String,
}

impl ReplyShaper {
    pub fn new(request_id: &str) -> Self {
        ReplyShaper {
            id_prefix: if request_id.is_empty() {
                format!("call_{:08x}", rand_u32())
            } else {
                format!("call_{request_id}")
            },
            ..Default::default()
        }
    }

    /// The chat reply's format is known: parse from now on (the prefill first).
    pub fn start(&mut self, reply: ChatReply) -> GenerateResponse {
        let resumed = !reply.resumed.is_empty();
        if reply.raw_output {
            return GenerateResponse {
                text: if resumed {
                    String::new()
                } else {
                    reply.prefill
                },
                ..Default::default()
            };
        }
        let mut parser = ChatParser::new(reply.format);
        if reply.single_tool_call {
            parser = parser.single_call();
        }
        let mut deltas = parser.push(&reply.prefill);
        deltas.extend(parser.push(&reply.resumed));
        self.parser = Some(parser);
        let first = self.shape(String::new(), Vec::new(), deltas);
        if resumed {
            // The previous worker sent all of it (tool-call count and ids are kept).
            GenerateResponse::default()
        } else {
            first
        }
    }

    /// A text delta from the engine.
    pub fn delta(&mut self, text: String, token_ids: Vec<u32>) -> GenerateResponse {
        match &mut self.parser {
            None => GenerateResponse {
                text,
                token_ids,
                ..Default::default()
            },
            Some(p) => {
                let deltas = p.push(&text);
                self.shape(String::new(), token_ids, deltas)
            }
        }
    }

    /// Held-back text at the end of the reply, if any.
    pub fn finish(&mut self) -> Option<GenerateResponse> {
        let deltas = self.parser.as_mut()?.finish();
        let msg = self.shape(String::new(), Vec::new(), deltas);
        let empty = msg.text.is_empty() && msg.reasoning.is_empty() && msg.tool_calls.is_empty();
        (!empty).then_some(msg)
    }

    /// A normal stop after tool calls is reported as TOOL_CALLS; so is any end after the reply
    /// was cut at its one tool call (what followed the call was dropped, so reaching max_tokens
    /// there truncated nothing the client sees).
    pub fn finish_reason(&self, reason: FinishReason) -> FinishReason {
        let cut = self.parser.as_ref().is_some_and(ChatParser::cut);
        if (reason == FinishReason::Stop && self.calls > 0)
            || (cut && reason == FinishReason::Length)
        {
            FinishReason::ToolCalls
        } else {
            reason
        }
    }

    fn shape(
        &mut self,
        mut text: String,
        token_ids: Vec<u32>,
        deltas: Vec<ChatDelta>,
    ) -> GenerateResponse {
        let mut reasoning = String::new();
        let mut tool_calls: Vec<ToolCallDelta> = Vec::new();
        for d in deltas {
            match d {
                ChatDelta::Content(t) => text.push_str(&t),
                ChatDelta::Reasoning(t) => reasoning.push_str(&t),
                ChatDelta::ToolCallBegin { index, name } => {
                    self.calls = self.calls.max(index + 1);
                    tool_calls.push(ToolCallDelta {
                        index,
                        id: format!("{}_{index}", self.id_prefix),
                        name,
                        arguments: String::new(),
                    });
                }
                ChatDelta::ToolCallArguments { index, text } => match tool_calls.last_mut() {
                    Some(c) if c.index == index => c.arguments.push_str(&text),
                    _ => tool_calls.push(ToolCallDelta {
                        index,
                        arguments: text,
                        ..Default::default()
                    }),
                },
            }
        }
        GenerateResponse {
            text,
            token_ids,
            reasoning,
            tool_calls,
            ..Default::default()
        }
    }
}

/// The engine's log-probabilities as `moe.v1` messages.
pub fn logprobs_pb(
    logprobs: Vec<crate::engine::TokenLogprob>,
) -> Vec<moe_common::pb::v1::TokenLogprob> {
    use moe_common::pb::v1::{TokenLogprob, TopLogprob};
    logprobs
        .into_iter()
        .map(|l| TokenLogprob {
            token: String::from_utf8_lossy(&l.bytes).into_owned(),
            bytes: l.bytes,
            logprob: l.logprob,
            top_logprobs: l
                .top
                .into_iter()
                .map(|(_, bytes, logprob)| TopLogprob {
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    bytes,
                    logprob,
                })
                .collect(),
        })
        .collect()
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_common::chat::ReasoningFormat;
    use moe_common::chat::ToolFormat;

    /// A chat reply of `reasoning` and `tools` format (not raw output).
    fn reply(
        reasoning: ReasoningFormat,
        tools: Option<ToolFormat>,
        prefill: &str,
        resumed: &str,
    ) -> ChatReply {
        ChatReply {
            format: ChatFormat { reasoning, tools },
            prefill: prefill.to_string(),
            raw_output: false,
            single_tool_call: false,
            resumed: resumed.to_string(),
        }
    }

    impl ChatReply {
        fn one_call(self) -> Self {
            ChatReply {
                single_tool_call: true,
                ..self
            }
        }
    }

    #[test]
    fn harmony_reply_is_split_into_reasoning_content_and_calls() {
        let mut s = ReplyShaper::new("r1");
        let first = s.start(reply(ReasoningFormat::Harmony, None, "", ""));
        assert!(first.text.is_empty());
        let m = s.delta(
            "<|channel|>analysis<|message|>think<|end|>".into(),
            vec![1, 2],
        );
        assert_eq!((m.reasoning.as_str(), m.text.as_str()), ("think", ""));
        assert_eq!(m.token_ids, [1, 2]);
        let m = s.delta(
            "<|start|>assistant<|channel|>final<|message|>Paris".into(),
            vec![3],
        );
        assert_eq!(m.text, "Paris");
        assert!(s.finish().is_none());
        assert_eq!(s.finish_reason(FinishReason::Stop), FinishReason::Stop);
    }

    #[test]
    fn a_forced_call_prefill_opens_the_call_and_stop_becomes_tool_calls() {
        let mut s = ReplyShaper::new("r1");
        let first = s.start(reply(
            ReasoningFormat::None,
            Some(ToolFormat::Hermes),
            "<tool_call>\n{\"name\": \"",
            "",
        ));
        assert!(first.tool_calls.is_empty(), "the name is not complete yet");
        let m = s.delta(
            "f\", \"arguments\": {\"a\": 1}}\n</tool_call>".into(),
            vec![7],
        );
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(m.tool_calls[0].name, "f");
        assert_eq!(m.tool_calls[0].id, "call_r1_0");
        assert_eq!(m.tool_calls[0].arguments, "{\"a\":1}");
        assert_eq!(s.finish_reason(FinishReason::Stop), FinishReason::ToolCalls);
        assert_eq!(s.finish_reason(FinishReason::Length), FinishReason::Length);
    }

    #[test]
    fn parallel_tool_calls_false_returns_the_first_call_only() {
        let req = GenerateRequest {
            tools_json: "[]".into(),
            parallel_tool_calls: Some(false),
            ..Default::default()
        };
        assert!(chat_job(&req).unwrap().single_tool_call);
        let mut s = ReplyShaper::new("r1");
        s.start(reply(ReasoningFormat::None, Some(ToolFormat::Hermes), "", "").one_call());
        let m = s.delta(
            "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\n<tool_call>".into(),
            vec![1],
        );
        assert_eq!(m.tool_calls.len(), 1);
        assert_eq!(m.token_ids, [1], "token ids still flow (usage, migration)");
        let m = s.delta(
            "{\"name\": \"g\", \"arguments\": {}}</tool_call>".into(),
            vec![2],
        );
        assert!(m.tool_calls.is_empty() && m.text.is_empty(), "{m:?}");
        assert!(s.finish().is_none());
        assert_eq!(
            s.finish_reason(FinishReason::Length),
            FinishReason::ToolCalls
        );
        assert_eq!(s.finish_reason(FinishReason::Stop), FinishReason::ToolCalls);
    }

    #[test]
    fn a_resumed_reply_continues_in_the_parser_state_of_the_previous_worker() {
        let mut s = ReplyShaper::new("r1");
        let first = s.start(reply(
            ReasoningFormat::Harmony,
            None,
            "",
            "<|channel|>analysis<|message|>The user asks",
        ));
        assert_eq!(first, GenerateResponse::default(), "nothing is sent twice");
        let m = s.delta(
            " about Paris.<|end|><|start|>assistant<|channel|>final<|message|>Paris".into(),
            vec![9],
        );
        assert_eq!(
            (m.reasoning.as_str(), m.text.as_str()),
            (" about Paris.", "Paris")
        );
    }

    #[test]
    fn proto_fields_become_the_chat_job() {
        let req = GenerateRequest {
            tools_json: "[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]".into(),
            tool_choice: Some(moe_common::pb::v1::ToolChoice {
                mode: ToolMode::Function as i32,
                function_name: "f".into(),
            }),
            ..Default::default()
        };
        let job = chat_job(&req).unwrap();
        assert_eq!(job.tools.len(), 1);
        assert_eq!(job.tool_choice, ToolChoice::Function("f".into()));
        let bad = GenerateRequest {
            tools_json: "{}".into(),
            ..Default::default()
        };
        assert!(chat_job(&bad).unwrap_err().starts_with("tools_json"));
    }
}
