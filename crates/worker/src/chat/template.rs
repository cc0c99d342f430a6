//! The GGUF's `tokenizer.chat_template` rendered with minijinja as Hugging Face's
//! `apply_chat_template` does (trim_blocks, lstrip_blocks, `raise_exception`, Python-style
//! `tojson`, `strftime_now`, Python string/dict methods, loop controls), with system / developer /
//! tool roles, tool calls in history, tool definitions and `reasoning_effort`.
//!
//! Message content is rendered as unique placeholders that are swapped back after rendering, so
//! the output is a list of [`Segment`]s: template text (special tokens parsed) and content (never
//! parsed for special tokens — a message holding `<|im_start|>` reaches the model as plain text).

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind, context};
use moe_common::chat::{ChatFormat, ReasoningFormat, ToolFormat};
use serde::Serialize;
use serde_json::Value as Json;

use super::{json, strftime};

/// A call the assistant made earlier in the conversation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text (an object, as the model wrote it).
    pub arguments: String,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Message {
    /// system, developer, user, assistant, tool (or any role the template knows).
    pub role: String,
    pub content: String,
    pub name: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    /// On `tool` messages: the call this is the result of.
    pub tool_call_id: Option<String>,
    /// On assistant messages: their reasoning (harmony `analysis`, `<think>`).
    pub reasoning_content: Option<String>,
}

pub struct RenderRequest<'a> {
    pub messages: &'a [Message],
    /// OpenAI-style tool definitions (`[{"type": "function", "function": {…}}]`).
    pub tools: Option<&'a Json>,
    pub add_generation_prompt: bool,
    /// "low", "medium", "high" (gpt-oss).
    pub reasoning_effort: Option<&'a str>,
}

/// A piece of the rendered prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Written by the template: tokenize with special tokens parsed.
    Template(String),
    /// A message's content: tokenize as plain text.
    Content(String),
}

/// Refusals are the caller's fault (INVALID_ARGUMENT): the template raised, or cannot take the
/// request (tools or a reasoning effort it does not know).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("the model's chat template does not compile: {0}")]
    Compile(String),
    #[error("the model's chat template failed: {0}")]
    Render(String),
    #[error("{0}")]
    Unsupported(String),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bytes", &self.source.len())
            .finish()
    }
}

const TEMPLATE: &str = "chat";

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(|state, value, method, args| {
            // `content.strip()` on a placeholder strips the content it stands for.
            if let (Some(s), "strip" | "lstrip" | "rstrip", []) = (value.as_str(), method, args)
                && let Some(p) = Placeholder::parse(s)
            {
                return Ok(Value::from(p.with_strip(method).to_string()));
            }
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        });
        env.add_filter("trim", |value: String| -> String {
            match Placeholder::parse(&value) {
                Some(p) => p.with_strip("strip").to_string(),
                None => value.trim().to_string(),
            }
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime::strftime_now);
        env.add_filter("tojson", json::tojson);
        env.add_template_owned(TEMPLATE, source.to_string())
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// Renders the conversation into segments (adjacent template text merged, empty dropped).
    pub fn render(&self, req: &RenderRequest<'_>) -> Result<Vec<Segment>, TemplateError> {
        if req.tools.is_some() && !self.source.contains("tools") {
            return Err(TemplateError::Unsupported(
                "tools: this model's chat template does not take tool definitions".into(),
            ));
        }
        // (`prompt::build_prompt` puts tools into the messages for such templates.)
        if req.reasoning_effort.is_some() && !self.source.contains("reasoning_effort") {
            return Err(TemplateError::Unsupported(
                "reasoning_effort: this model's chat template has no reasoning effort".into(),
            ));
        }
        let nonce = nonce();
        let messages: Vec<TemplateMessage> = req
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| TemplateMessage::new(m, placeholder(nonce, i)))
            .collect();
        let tmpl = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| TemplateError::Compile(describe(&e)))?;
        let rendered = tmpl
            .render(context! {
                messages => messages,
                tools => req.tools.map(Value::from_serialize),
                add_generation_prompt => req.add_generation_prompt,
                reasoning_effort => req.reasoning_effort,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        split(&rendered, nonce, req.messages)
    }

    /// The output format of a reply to a prompt that ends with `prompt_tail`.
    pub fn format(&self, prompt_tail: &str, has_tools: bool) -> ChatFormat {
        let s = &self.source;
        let reasoning = if s.contains("<|channel|>") {
            ReasoningFormat::Harmony
        } else if s.contains("<think>") {
            ReasoningFormat::Think {
                starts_in_reasoning: prompt_tail.trim_end().ends_with("<think>"),
            }
        } else {
            ReasoningFormat::None
        };
        let tools = if !has_tools {
            None
        } else if s.contains("<tool_call>") {
            Some(ToolFormat::Hermes)
        } else if s.contains("<|python_tag|>") || s.contains("<|start_header_id|>") {
            Some(ToolFormat::Llama3Json)
        } else {
            // Unknown markup: JSON-in-tags is the most common open-weight convention.
            Some(ToolFormat::Hermes)
        };
        ChatFormat { reasoning, tools }
    }
}

/// The message as Hugging Face templates read it.
#[derive(Serialize)]
struct TemplateMessage {
    role: String,
    content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Json>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<String>,
    /// gpt-oss's template reads the reasoning as `thinking`.
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<String>,
}

impl TemplateMessage {
    fn new(m: &Message, placeholder: String) -> Self {
        let content = if !m.content.is_empty() {
            // Empty content stays empty: templates test it for truthiness.
            Some(placeholder)
        } else if m.tool_calls.is_empty() {
            Some(String::new())
        } else {
            None
        };
        let tool_calls = m
            .tool_calls
            .iter()
            .map(|c| {
                // Templates expect the arguments as a mapping (they `tojson` it).
                let arguments = serde_json::from_str::<Json>(&c.arguments)
                    .ok()
                    .filter(Json::is_object)
                    .unwrap_or_else(|| Json::String(c.arguments.clone()));
                serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": arguments},
                })
            })
            .collect();
        TemplateMessage {
            role: m.role.clone(),
            content,
            name: m.name.clone(),
            tool_calls,
            tool_call_id: m.tool_call_id.clone(),
            reasoning_content: m.reasoning_content.clone(),
            thinking: m.reasoning_content.clone(),
        }
    }
}

const OPEN: char = '\u{E000}';
const CLOSE: char = '\u{E001}';

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Stands for message `index`'s content while the template runs: `OPEN nonce:index:flags CLOSE`,
/// where flags record `trim`/`strip` applied to it (`l` strip the start, `r` the end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placeholder {
    nonce: u64,
    index: usize,
    left: bool,
    right: bool,
}

impl Placeholder {
    fn new(nonce: u64, index: usize) -> Self {
        Placeholder {
            nonce,
            index,
            left: false,
            right: false,
        }
    }

    /// A whole placeholder string.
    fn parse(s: &str) -> Option<Self> {
        let inner = s.strip_prefix(OPEN)?.strip_suffix(CLOSE)?;
        let mut parts = inner.split(':');
        let nonce = u64::from_str_radix(parts.next()?, 16).ok()?;
        let index = parts.next()?.parse().ok()?;
        let flags = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Placeholder {
            nonce,
            index,
            left: flags.contains('l'),
            right: flags.contains('r'),
        })
    }

    fn with_strip(mut self, method: &str) -> Self {
        self.left |= method != "rstrip";
        self.right |= method != "lstrip";
        self
    }

    fn apply<'c>(&self, content: &'c str) -> &'c str {
        match (self.left, self.right) {
            (true, true) => content.trim(),
            (true, false) => content.trim_start(),
            (false, true) => content.trim_end(),
            (false, false) => content,
        }
    }
}

impl std::fmt::Display for Placeholder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let flags = match (self.left, self.right) {
            (true, true) => "lr",
            (true, false) => "l",
            (false, true) => "r",
            (false, false) => "",
        };
        write!(f, "{OPEN}{:016x}:{}:{flags}{CLOSE}", self.nonce, self.index)
    }
}

fn placeholder(nonce: u64, index: usize) -> String {
    Placeholder::new(nonce, index).to_string()
}

/// Swaps placeholders back for their messages' content. A placeholder the template cut or
/// rewrote is an error: its content cannot be told apart from template text.
fn split(rendered: &str, nonce: u64, messages: &[Message]) -> Result<Vec<Segment>, TemplateError> {
    let prefix = format!("{OPEN}{nonce:016x}:");
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = rendered;
    while let Some(at) = rest.find(&prefix) {
        let end = rest[at..].find(CLOSE).map(|e| at + e + CLOSE.len_utf8());
        let p = end
            .and_then(|end| Placeholder::parse(&rest[at..end]))
            .filter(|p| p.index < messages.len());
        let (Some(p), Some(end)) = (p, end) else {
            return Err(mangled());
        };
        text.push_str(&rest[..at]);
        if !text.is_empty() {
            out.push(Segment::Template(std::mem::take(&mut text)));
        }
        let content = p.apply(&messages[p.index].content);
        if !content.is_empty() {
            out.push(Segment::Content(content.to_string()));
        }
        rest = &rest[end..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Segment::Template(text));
    }
    let cut = |s: &Segment| matches!(s, Segment::Template(t) if t.contains(OPEN));
    if out.iter().any(cut) && !messages.iter().any(|m| m.content.contains(OPEN)) {
        return Err(mangled());
    }
    Ok(out)
}

fn mangled() -> TemplateError {
    TemplateError::Render(
        "the template transforms message content in a way this server cannot keep apart from template text".into(),
    )
}

/// minijinja's error with its template line, as one line.
fn describe(e: &Error) -> String {
    let mut s = e.detail().map_or_else(|| e.to_string(), str::to_string);
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s
}

#[cfg(test)]
mod tests;
