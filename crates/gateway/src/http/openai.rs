//! The OpenAI wire format and its pure mapping to and from `moe.v1`: request bodies into a
//! `GenerateRequest`, `GenerateResponse`s into completion objects and stream chunks.

use moe_common::pb::v1::TokenLogprob;
use moe_common::pb::{
    ChatMessage, FinishReason, GenerateRequest, GenerateResponse, LatencyClass, SamplingParams,
    Usage,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::chat::{self, Reply};
use super::error::ApiError;

/// `max_tokens` when a request sets neither `max_tokens` nor `max_completion_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// OpenAI's default temperature, used when a request sets none.
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

/// The body of `/v1/chat/completions` (`messages`) and `/v1/completions` (`prompt`). Every field
/// the API accepts is listed here; any other field is refused with a 400 naming it (the body is
/// parsed with `moe_common::chat::strict`), and the fields we accept only at their "off" value are
/// checked in [`refuse_unsupported`]. Nothing is silently ignored.
#[derive(Debug, Default, Deserialize)]
pub struct Body {
    /// Chat only.
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Completions only: a string, or an array holding exactly one string.
    pub prompt: Option<Value>,
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// Extension (llama.cpp, vLLM): keep the K most likely tokens; 0 is off.
    pub top_k: Option<i32>,
    /// Extension (llama.cpp, vLLM).
    pub min_p: Option<f32>,
    /// Extension (vLLM's name for llama.cpp's `repeat_penalty`).
    pub repetition_penalty: Option<f32>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    /// OpenAI's free-form metadata; `latency_class` is read from it, other keys are opaque.
    pub metadata: Option<Map<String, Value>>,
    /// An end-user id for abuse tracking: accepted, has no effect on the output.
    pub user: Option<String>,
    /// Accepted only as `false`: nothing is stored.
    pub store: Option<bool>,
    // Accepted only at the value that turns them off (OpenAI SDKs and frameworks send explicit
    // defaults); any other value is refused until it is implemented.
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Chat: a boolean; completions: the number of top log-probabilities.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Chat: "low", "medium" or "high", passed to the chat template (gpt-oss).
    pub reasoning_effort: Option<String>,
    /// Chat (extension): the model's raw text, special tokens included, nothing parsed.
    pub raw_output: Option<bool>,
    /// Extension (`GenerateRequest.batch_invariant`): require a batch-invariant worker, one whose
    /// greedy or seeded output does not depend on other traffic; refused (400 naming it) when
    /// no worker serving the model is one. OpenAI SDKs send it through `extra_body`.
    pub batch_invariant: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

pub use super::chat::ChatMessageIn;

/// A request translated for `GatewayService::start`, with what the HTTP layer needs to answer.
#[derive(Debug)]
pub struct Mapped {
    pub request: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
}

/// Which endpoint is answering: decides the object names and how text is carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

pub fn chat_request(mut body: Body, class: LatencyClass) -> Result<Mapped, ApiError> {
    if body.prompt.is_some() {
        return Err(unsupported(
            "prompt",
            "use messages on /v1/chat/completions",
        ));
    }
    refuse_unsupported(&body, Kind::Chat)?;
    let messages = body.messages.take().unwrap_or_default();
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            let content = message_text(&m.content).ok_or_else(|| {
                ApiError::invalid(
                    format!("messages[{i}].content"),
                    "content must be a string, null, or an array of text parts",
                )
            })?;
            // Newer OpenAI clients send "developer" where most chat templates know "system".
            if m.role == "developer" {
                m.role = "system".into();
            }
            chat::message(i, m, content)
        })
        .collect::<Result<Vec<ChatMessage>, ApiError>>()?;
    let mut request = GenerateRequest {
        messages,
        ..Default::default()
    };
    chat::apply(
        &mut request,
        chat::ChatFields {
            tools: body.tools.take(),
            tool_choice: body.tool_choice.take(),
            parallel_tool_calls: body.parallel_tool_calls,
            response_format: body.response_format.take(),
            reasoning_effort: body.reasoning_effort.take(),
            raw_output: body.raw_output,
        },
    )?;
    apply_params(request, body, class)
}

pub fn completion_request(body: Body, class: LatencyClass) -> Result<Mapped, ApiError> {
    if body.messages.is_some() {
        return Err(unsupported("messages", "use prompt on /v1/completions"));
    }
    refuse_unsupported(&body, Kind::Completion)?;
    let not_one_string = || {
        ApiError::invalid(
            "prompt",
            "prompt must be a string or an array of exactly one string (token arrays and batches are not supported)",
        )
    };
    let prompt = match &body.prompt {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(s)] => s.clone(),
            _ => return Err(not_one_string()),
        },
        None | Some(Value::Null) => return Err(ApiError::invalid("prompt", "prompt is required")),
        _ => return Err(not_one_string()),
    };
    let request = GenerateRequest {
        prompt,
        ..Default::default()
    };
    apply_params(request, body, class)
}

/// 400 naming a parameter this server does not implement (or not with that value).
pub fn unsupported(param: &str, detail: &str) -> ApiError {
    let mut e = ApiError::invalid(
        param,
        format!("unsupported parameter: {param} is not supported by this server ({detail})"),
    );
    e.code = Some("unsupported_parameter");
    e
}

/// Refuses fields that are accepted only at the value that turns them off.
fn refuse_unsupported(b: &Body, kind: Kind) -> Result<(), ApiError> {
    for (name, v) in [
        ("presence_penalty", b.presence_penalty),
        ("frequency_penalty", b.frequency_penalty),
    ] {
        if v.is_some_and(|x| !(-2.0..=2.0).contains(&x)) {
            return Err(ApiError::invalid(
                name,
                format!("{name} must be between -2 and 2"),
            ));
        }
    }
    if b.store == Some(true) {
        return Err(unsupported("store", "completions are never stored"));
    }
    if kind == Kind::Chat {
        return Ok(());
    }
    // Chat-only fields, at a value that does something.
    if let Some(f) = &b.response_format {
        let t = f.get("type").and_then(Value::as_str);
        if t != Some("text") || f.as_object().is_some_and(|o| o.len() > 1) {
            return Err(unsupported(
                "response_format",
                "structured output is supported on /v1/chat/completions",
            ));
        }
    }
    if b.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported(
            "tools",
            "tools are supported on /v1/chat/completions",
        ));
    }
    match &b.tool_choice {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" || s == "auto" => {}
        Some(_) => return Err(unsupported("tool_choice", "there are no tools")),
    }
    if b.reasoning_effort.is_some() {
        return Err(unsupported("reasoning_effort", "a chat template setting"));
    }
    if b.raw_output.is_some() {
        return Err(unsupported(
            "raw_output",
            "completions are raw text already",
        ));
    }
    Ok(())
}

/// The text of a chat message's content: text parts are joined with newlines.
fn message_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some(String::new()),
        Value::Array(parts) => {
            let texts = parts
                .iter()
                .map(
                    |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Some(t.as_str()),
                        _ => None,
                    },
                )
                .collect::<Option<Vec<_>>>()?;
            Some(texts.join("\n"))
        }
        _ => None,
    }
}

fn apply_params(
    mut request: GenerateRequest,
    p: Body,
    class: LatencyClass,
) -> Result<Mapped, ApiError> {
    if let Some(n) = p.n
        && n != 1
    {
        return Err(ApiError::invalid(
            "n",
            format!("n is {n}; only n=1 is supported"),
        ));
    }
    (request.logprobs, request.top_logprobs) = logprobs_fields(&p, !request.messages.is_empty())?;
    request.model = p.model.unwrap_or_default();
    request.max_tokens = p
        .max_completion_tokens
        .or(p.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    request.sampling = Some(SamplingParams {
        temperature: p.temperature.unwrap_or(DEFAULT_TEMPERATURE),
        top_k: p.top_k.unwrap_or(0),
        top_p: p.top_p.unwrap_or(0.0),
        min_p: p.min_p.unwrap_or(0.0),
        repeat_penalty: p.repetition_penalty.unwrap_or(0.0),
        // Negative seeds are accepted and reinterpreted: same seed, same output still holds.
        seed: p.seed.map(|s| s as u64),
        presence_penalty: p.presence_penalty.unwrap_or(0.0),
        frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
    });
    request.stop = match p.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    request.latency_class = class as i32;
    request.batch_invariant = p.batch_invariant.unwrap_or(false);
    let stream = p.stream.unwrap_or(false);
    Ok(Mapped {
        request,
        stream,
        include_usage: stream && p.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// (logprobs, top_logprobs): chat takes `logprobs: bool` and `top_logprobs: 0-20`,
/// completions `logprobs: N` (the N most likely alternatives, 0-20).
fn logprobs_fields(b: &Body, chat: bool) -> Result<(bool, u32), ApiError> {
    let top_err = || ApiError::invalid("top_logprobs", "top_logprobs must be 0-20, with logprobs");
    if chat {
        let on = match &b.logprobs {
            None | Some(Value::Null) => false,
            Some(Value::Bool(on)) => *on,
            Some(_) => return Err(ApiError::invalid("logprobs", "logprobs must be a boolean")),
        };
        let top = b.top_logprobs.unwrap_or(0);
        if top > 20 || (top > 0 && !on) {
            return Err(top_err());
        }
        Ok((on, top))
    } else {
        if b.top_logprobs.is_some() {
            return Err(unsupported(
                "top_logprobs",
                "use logprobs: N on /v1/completions",
            ));
        }
        match &b.logprobs {
            None | Some(Value::Null) => Ok((false, 0)),
            Some(v) => match v.as_u64().filter(|&n| n <= 20) {
                Some(n) => Ok((true, n as u32)),
                None => Err(ApiError::invalid(
                    "logprobs",
                    "logprobs must be a whole number 0-20",
                )),
            },
        }
    }
}

/// The choice's `logprobs` for these tokens: chat's `{"content": [...]}` or the legacy
/// completions object; null when none were asked for.
pub fn logprobs_json(kind: Kind, lps: &[TokenLogprob]) -> Value {
    if lps.is_empty() {
        return Value::Null;
    }
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = lps
                .iter()
                .map(|l| {
                    let top: Vec<Value> = l
                        .top_logprobs
                        .iter()
                        .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes}))
                        .collect();
                    json!({"token": l.token, "logprob": l.logprob, "bytes": l.bytes,
                           "top_logprobs": top})
                })
                .collect();
            json!({"content": content})
        }
        Kind::Completion => {
            let mut offset = 0;
            let mut offsets = Vec::new();
            for l in lps {
                offsets.push(offset);
                offset += l.token.len();
            }
            let top: Vec<Value> = lps
                .iter()
                .map(|l| {
                    l.top_logprobs
                        .iter()
                        .map(|t| (t.token.clone(), json!(t.logprob)))
                        .collect::<Map<String, Value>>()
                        .into()
                })
                .collect();
            json!({
                "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// The latency class from the `x-moe-latency-class` header or, failing that, the body's
/// `metadata.latency_class`; INTERACTIVE when neither is set. The header wins when both are.
pub fn latency_class(
    header: Option<&str>,
    metadata: Option<&Map<String, Value>>,
) -> Result<LatencyClass, ApiError> {
    let (source, value) = match (header, metadata.and_then(|m| m.get("latency_class"))) {
        (Some(h), _) => ("x-moe-latency-class", h),
        (None, Some(Value::String(s))) => ("metadata.latency_class", s.as_str()),
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "metadata.latency_class",
                "latency_class must be a string",
            ));
        }
        (None, None) => return Ok(LatencyClass::Interactive),
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "interactive" => Ok(LatencyClass::Interactive),
        "batch" => Ok(LatencyClass::Batch),
        other => Err(ApiError::invalid(
            source,
            format!("latency class {other:?} is not one of \"interactive\", \"batch\""),
        )),
    }
}

/// OpenAI's `finish_reason` for a final message; `None` before it. CANCELLED (the server gave
/// up on the stream, e.g. its deadline passed) has no OpenAI counterpart and reads as "stop".
pub fn finish_reason(code: i32) -> Option<&'static str> {
    match FinishReason::try_from(code).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Unspecified => None,
        FinishReason::Stop | FinishReason::Cancelled => Some("stop"),
        FinishReason::Length => Some("length"),
        FinishReason::ToolCalls => Some("tool_calls"),
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_prompt_tokens },
    })
}

/// A response's `system_fingerprint`: the producing worker's (the final message's
/// `system_fingerprint`), or null when it sent none (a worker older than the field).
pub fn system_fingerprint(fingerprint: &str) -> Value {
    if fingerprint.is_empty() {
        Value::Null
    } else {
        fingerprint.into()
    }
}

/// What every object of one response shares.
#[derive(Clone, Debug)]
pub struct Shape {
    pub kind: Kind,
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    /// Unix seconds when the request arrived.
    pub created: u64,
    pub model: String,
}

impl Shape {
    pub fn new(kind: Kind, created: u64, model: String) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Shape {
            kind,
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created,
            model,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One stream chunk for a `GenerateResponse`. The first chat chunk carries the assistant
    /// role; the final one carries `finish_reason` (and its text, if any) and the
    /// `system_fingerprint` of the worker that produced the end of the stream, which is known
    /// only then (a stream may migrate): earlier chunks have no `system_fingerprint`.
    pub fn chunk(&self, msg: &GenerateResponse, first: bool, include_usage: bool) -> Value {
        let finish = finish_reason(msg.finish_reason);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if !msg.text.is_empty() || (first && finish.is_none() && !chat::has_extras(msg)) {
                    delta.insert("content".into(), msg.text.clone().into());
                }
                chat::delta_extras(msg, &mut delta);
                json!({"index": 0, "delta": delta, "logprobs": logprobs_json(self.kind, &msg.logprobs),
                       "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": msg.text,
                       "logprobs": logprobs_json(self.kind, &msg.logprobs), "finish_reason": finish})
            }
        };
        let mut v = self.envelope(true, json!([choice]));
        if finish.is_some() {
            v["system_fingerprint"] = system_fingerprint(&msg.system_fingerprint);
        }
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The extra last chunk of `stream_options.include_usage`: no choices, the usage, and the
    /// final message's `system_fingerprint`.
    pub fn usage_chunk(&self, usage: &Usage, fingerprint: &str) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["system_fingerprint"] = system_fingerprint(fingerprint);
        v["usage"] = usage_json(usage);
        v
    }

    /// The whole (non-streamed) completion; `fingerprint` is the final message's
    /// `system_fingerprint`.
    pub fn complete(&self, reply: &Reply, finish: &str, usage: &Usage, fingerprint: &str) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": reply.message(),
                "logprobs": logprobs_json(self.kind, &reply.logprobs),
                "finish_reason": finish,
            }),
            Kind::Completion => {
                json!({"index": 0, "text": reply.text,
                       "logprobs": logprobs_json(self.kind, &reply.logprobs), "finish_reason": finish})
            }
        };
        let mut v = self.envelope(false, json!([choice]));
        v["system_fingerprint"] = system_fingerprint(fingerprint);
        v["usage"] = usage_json(usage);
        v
    }
}

#[cfg(test)]
mod tests;
