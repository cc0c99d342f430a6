//! The chat-only parts of the OpenAI API: messages with tool calls and tool results, `tools`,
//! `tool_choice`, `parallel_tool_calls`, `response_format`, `reasoning_effort`, `raw_output`
//! (mapped onto `moe.v1`), and the reply's `reasoning_content` and `tool_calls`, assembled for
//! whole answers and passed on as deltas when streaming.

use moe_common::pb::v1::response_format::Type as FormatType;
use moe_common::pb::v1::tool_choice::Mode as ToolMode;
use moe_common::pb::v1::{ResponseFormat, ToolCall, ToolCallDelta, ToolChoice};
use moe_common::pb::{ChatMessage, GenerateRequest, GenerateResponse};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, an array of content parts, or null (an assistant turn with tool calls only).
    #[serde(default)]
    pub content: Value,
    pub name: Option<String>,
    /// Assistant turns: the calls made.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// Tool turns: the call answered.
    pub tool_call_id: Option<String>,
    /// Assistant turns: their reasoning (as returned in `reasoning_content`).
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ToolCallIn {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCallIn,
}

#[derive(Debug, Deserialize)]
pub struct FunctionCallIn {
    pub name: String,
    pub arguments: String,
}

/// Chat-only request fields.
#[derive(Debug, Default)]
pub struct ChatFields {
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    pub reasoning_effort: Option<String>,
    pub raw_output: Option<bool>,
}

pub fn message(i: usize, m: ChatMessageIn, content: String) -> Result<ChatMessage, ApiError> {
    let tool_calls = m
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(j, c)| {
            if c.kind != "function" {
                return Err(ApiError::invalid(
                    format!("messages[{i}].tool_calls[{j}].type"),
                    "only \"function\" tool calls are supported",
                ));
            }
            Ok(ToolCall {
                id: c.id,
                name: c.function.name,
                arguments: c.function.arguments,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ChatMessage {
        role: m.role,
        content,
        name: m.name.unwrap_or_default(),
        tool_calls,
        tool_call_id: m.tool_call_id.unwrap_or_default(),
        reasoning_content: m.reasoning_content.unwrap_or_default(),
    })
}

pub fn apply(req: &mut GenerateRequest, f: ChatFields) -> Result<(), ApiError> {
    if let Some(tools) = f.tools.filter(|t| !t.is_empty()) {
        req.tools_json = Value::Array(tools).to_string();
    }
    req.tool_choice = match f.tool_choice {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(ToolChoice {
            mode: match s.as_str() {
                "auto" => ToolMode::Auto,
                "none" => ToolMode::None,
                "required" => ToolMode::Required,
                _ => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        "tool_choice must be \"auto\", \"none\", \"required\" or a named function",
                    ));
                }
            } as i32,
            function_name: String::new(),
        }),
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tool_choice",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            Some(ToolChoice {
                mode: ToolMode::Function as i32,
                function_name: name.to_string(),
            })
        }
    };
    req.parallel_tool_calls = f.parallel_tool_calls;
    req.response_format = match f.response_format {
        None => None,
        Some(v) => Some(response_format(&v)?),
    };
    req.reasoning_effort = f.reasoning_effort.unwrap_or_default();
    req.raw_output = f.raw_output.unwrap_or(false);
    Ok(())
}

fn response_format(v: &Value) -> Result<ResponseFormat, ApiError> {
    let bad = |m: &str| ApiError::invalid("response_format", m);
    let obj = v
        .as_object()
        .ok_or_else(|| bad("response_format must be an object"))?;
    let allowed: &[&str] = match obj.get("type").and_then(Value::as_str) {
        Some("text") | Some("json_object") => &["type"],
        Some("json_schema") => &["type", "json_schema"],
        _ => {
            return Err(bad(
                "type must be \"text\", \"json_object\" or \"json_schema\"",
            ));
        }
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(super::openai::unsupported(
            &format!("response_format.{k}"),
            "unknown field",
        ));
    }
    Ok(match obj["type"].as_str() {
        Some("json_object") => ResponseFormat {
            r#type: FormatType::JsonObject as i32,
            json_schema: String::new(),
        },
        Some("json_schema") => {
            let js = obj
                .get("json_schema")
                .and_then(Value::as_object)
                .ok_or_else(|| bad("json_schema must be an object with a schema"))?;
            if let Some(k) = js
                .keys()
                .find(|k| !["name", "description", "schema", "strict"].contains(&k.as_str()))
            {
                return Err(super::openai::unsupported(
                    &format!("response_format.json_schema.{k}"),
                    "unknown field",
                ));
            }
            let schema = js.get("schema").cloned().unwrap_or_else(|| json!({}));
            ResponseFormat {
                r#type: FormatType::JsonSchema as i32,
                json_schema: schema.to_string(),
            }
        }
        _ => ResponseFormat::default(),
    })
}

/// The `delta` fields of a streamed chunk for `msg` besides role and content.
pub fn delta_extras(msg: &GenerateResponse, delta: &mut Map<String, Value>) {
    if !msg.reasoning.is_empty() {
        delta.insert("reasoning_content".into(), msg.reasoning.clone().into());
    }
    if !msg.tool_calls.is_empty() {
        let calls: Vec<Value> = msg
            .tool_calls
            .iter()
            .map(|c| {
                let mut call = json!({"index": c.index, "function": {"arguments": c.arguments}});
                if !c.id.is_empty() {
                    call["id"] = c.id.clone().into();
                    call["type"] = "function".into();
                    call["function"]["name"] = c.name.clone().into();
                }
                call
            })
            .collect();
        delta.insert("tool_calls".into(), calls.into());
    }
}

/// Whether `msg` carries anything for the client besides content.
pub fn has_extras(msg: &GenerateResponse) -> bool {
    !msg.reasoning.is_empty() || !msg.tool_calls.is_empty()
}

/// A whole reply, assembled from the stream.
#[derive(Debug, Default)]
pub struct Reply {
    pub text: String,
    pub logprobs: Vec<moe_common::pb::v1::TokenLogprob>,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCallDelta>,
}

impl Reply {
    pub fn push(&mut self, msg: &GenerateResponse) {
        self.text.push_str(&msg.text);
        self.reasoning.push_str(&msg.reasoning);
        self.logprobs.extend(msg.logprobs.iter().cloned());
        for c in &msg.tool_calls {
            match self.tool_calls.iter_mut().find(|t| t.index == c.index) {
                Some(t) => t.arguments.push_str(&c.arguments),
                None => self.tool_calls.push(c.clone()),
            }
        }
    }

    /// The `message` object of a whole chat completion.
    pub fn message(&self) -> Value {
        let mut m = json!({"role": "assistant", "content": self.text});
        if self.text.is_empty() && !self.tool_calls.is_empty() {
            m["content"] = Value::Null;
        }
        if !self.reasoning.is_empty() {
            m["reasoning_content"] = self.reasoning.clone().into();
        }
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect::<Vec<_>>()
                .into();
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_fields_map_to_the_proto() {
        let mut req = GenerateRequest::default();
        apply(
            &mut req,
            ChatFields {
                tools: Some(vec![json!({"type": "function", "function": {"name": "f"}})]),
                tool_choice: Some(json!({"type": "function", "function": {"name": "f"}})),
                parallel_tool_calls: Some(false),
                response_format: Some(json!({"type": "json_schema",
                    "json_schema": {"name": "x", "strict": true, "schema": {"type": "object"}}})),
                reasoning_effort: Some("low".into()),
                raw_output: None,
            },
        )
        .unwrap();
        assert!(req.tools_json.contains("\"f\""));
        let c = req.tool_choice.unwrap();
        assert_eq!(
            (c.mode(), c.function_name.as_str()),
            (ToolMode::Function, "f")
        );
        let f = req.response_format.unwrap();
        assert_eq!(f.r#type(), FormatType::JsonSchema);
        assert_eq!(f.json_schema, r#"{"type":"object"}"#);
        assert_eq!(req.reasoning_effort, "low");
        let mut req = GenerateRequest::default();
        let e = apply(
            &mut req,
            ChatFields {
                response_format: Some(
                    json!({"type": "json_schema", "json_schema": {"schema": {}, "x": 1}}),
                ),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("response_format.json_schema.x"));
    }

    #[test]
    fn replies_assemble_tool_calls_and_reasoning() {
        let mut r = Reply::default();
        r.push(&GenerateResponse {
            reasoning: "hm".into(),
            tool_calls: vec![ToolCallDelta {
                index: 0,
                id: "call_0".into(),
                name: "f".into(),
                arguments: "{\"a\"".into(),
            }],
            ..Default::default()
        });
        let mut delta = Map::new();
        delta_extras(
            &GenerateResponse {
                tool_calls: vec![ToolCallDelta {
                    index: 0,
                    arguments: ": 1}".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            &mut delta,
        );
        assert_eq!(
            Value::Object(delta.clone()),
            json!({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]})
        );
        r.push(&GenerateResponse {
            tool_calls: vec![ToolCallDelta {
                index: 0,
                arguments: ": 1}".into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(
            r.message(),
            json!({"role": "assistant", "content": null, "reasoning_content": "hm",
                   "tool_calls": [{"id": "call_0", "type": "function",
                                   "function": {"name": "f", "arguments": "{\"a\": 1}"}}]})
        );
    }
}
