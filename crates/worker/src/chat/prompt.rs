//! A chat request turned into prompt tokens: the template rendered into segments, each tokenized
//! with special tokens parsed only in template text; plus what the reply needs — the output format
//! to parse, and for forced tool calls and JSON output a prefill (text appended after the
//! generation prompt, which the reply parser reads first) and a GBNF grammar for the rest.

use moe_common::chat::grammar::{self, GrammarBuilder, literal};
use moe_common::chat::{ChatFormat, ReasoningFormat, ToolFormat};
use serde_json::Value as Json;

use super::template::{ChatTemplate, Message, RenderRequest, Segment, TemplateError};

/// What prompt building needs from the model's tokenizer.
pub trait Tokenize {
    /// Token ids of `text`; `add_special` adds BOS where the model wants it, `parse_special`
    /// turns special-token text into special tokens.
    fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32>;
    /// The text of every special (control) token, refused inside tool definitions and arguments,
    /// which the template writes as template text.
    fn special_texts(&self) -> Vec<String>;
}

#[derive(Clone, Debug, Default, PartialEq)]
pub enum ToolChoice {
    #[default]
    Auto,
    None,
    Required,
    Function(String),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub enum OutputFormat {
    #[default]
    Text,
    JsonObject,
    JsonSchema(Json),
}

pub struct ChatRequest<'a> {
    pub messages: &'a [Message],
    /// OpenAI tool objects (`{"type": "function", "function": {"name", "parameters", …}}`).
    pub tools: &'a [Json],
    pub tool_choice: ToolChoice,
    pub output: OutputFormat,
    pub reasoning_effort: Option<&'a str>,
}

#[derive(Debug, PartialEq)]
pub struct ChatPrompt {
    pub tokens: Vec<u32>,
    pub format: ChatFormat,
    /// Appended to the prompt after the generation prompt; the reply parser reads it first.
    pub prefill: String,
    /// GBNF for the generated text (after the prefill).
    pub grammar: Option<String>,
}

pub fn build_prompt(
    template: &ChatTemplate,
    tok: &dyn Tokenize,
    req: &ChatRequest<'_>,
) -> Result<ChatPrompt, TemplateError> {
    let tools = tool_specs(req.tools)?;
    let specials = tok.special_texts();
    refuse_special_text(req, &specials)?;
    let forced: Vec<&ToolSpec> = match &req.tool_choice {
        ToolChoice::Auto | ToolChoice::None => Vec::new(),
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Function(name) => {
            vec![tools.iter().find(|t| &t.name == name).ok_or_else(|| {
                TemplateError::Unsupported(format!("tool_choice: no tool is named {name:?}"))
            })?]
        }
    };
    if matches!(req.tool_choice, ToolChoice::Required) && tools.is_empty() {
        return Err(TemplateError::Unsupported(
            "tool_choice: \"required\" needs tools".into(),
        ));
    }
    if !forced.is_empty() && req.output != OutputFormat::Text {
        return Err(TemplateError::Unsupported(
            "response_format cannot be combined with a forced tool call".into(),
        ));
    }
    let offer_tools = !req.tools.is_empty() && req.tool_choice != ToolChoice::None;
    let tools_json = Json::Array(req.tools.to_vec());
    // A template that knows no tools gets them in a system message, Hermes-style.
    let generic = offer_tools && !template.source().contains("tools");
    let messages = if generic {
        generic_tool_messages(req.messages, &tools_json)
    } else {
        req.messages.to_vec()
    };
    let segments = template.render(&RenderRequest {
        messages: &messages,
        tools: (offer_tools && !generic).then_some(&tools_json),
        add_generation_prompt: true,
        reasoning_effort: req.reasoning_effort,
    })?;
    let rendered: String = segments.iter().map(segment_text).collect();
    let mut format = template.format(&rendered, offer_tools);
    if generic {
        format.tools = Some(ToolFormat::Hermes);
    }
    let (prefill, grammar) = if !forced.is_empty() {
        forced_call(format, &forced)?
    } else {
        json_output(format, &req.output)?
    };
    let mut tokens = Vec::new();
    let mut add_special =
        !rendered.starts_with(template.bos_token()) || template.bos_token().is_empty();
    for s in &segments {
        let (text, special) = match s {
            Segment::Template(t) => (t, true),
            Segment::Content(c) => (c, false),
        };
        tokens.extend(tok.tokenize(text, add_special, special));
        add_special = false;
    }
    if !prefill.is_empty() {
        tokens.extend(tok.tokenize(&prefill, false, true));
    }
    Ok(ChatPrompt {
        tokens,
        format,
        prefill,
        grammar,
    })
}

/// The conversation for a template without tool support: tool definitions and instructions in
/// the system message, earlier calls written as `<tool_call>` text, results as `tool` turns.
fn generic_tool_messages(messages: &[Message], tools: &Json) -> Vec<Message> {
    let instructions = format!(
        "You may call one or more functions to assist with the user query. The function \
         signatures are within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\
         For each function call, return a JSON object with the function name and arguments \
         within <tool_call></tool_call> XML tags:\n<tool_call>\n\
         {{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
    );
    let mut out: Vec<Message> = messages
        .iter()
        .map(|m| {
            let mut m = m.clone();
            for c in std::mem::take(&mut m.tool_calls) {
                let args = serde_json::from_str::<Json>(&c.arguments)
                    .unwrap_or(Json::String(c.arguments.clone()));
                let call = serde_json::json!({"name": c.name, "arguments": args});
                if !m.content.is_empty() {
                    m.content.push('\n');
                }
                m.content
                    .push_str(&format!("<tool_call>\n{call}\n</tool_call>"));
            }
            m
        })
        .collect();
    match out.first_mut() {
        Some(first) if first.role == "system" || first.role == "developer" => {
            first.content = format!("{}\n\n{instructions}", first.content);
        }
        _ => out.insert(
            0,
            Message {
                role: "system".into(),
                content: instructions,
                ..Default::default()
            },
        ),
    }
    out
}

fn segment_text(s: &Segment) -> &str {
    match s {
        Segment::Template(t) | Segment::Content(t) => t,
    }
}

struct ToolSpec {
    name: String,
    parameters: Json,
}

fn tool_specs(tools: &[Json]) -> Result<Vec<ToolSpec>, TemplateError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let bad = |what: &str| TemplateError::Unsupported(format!("tools[{i}]: {what}"));
            if t.get("type").and_then(Json::as_str) != Some("function") {
                return Err(bad("only tools of type \"function\" are supported"));
            }
            let f = t
                .get("function")
                .ok_or_else(|| bad("function is missing"))?;
            let name = f
                .get("name")
                .and_then(Json::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad("function.name must be a non-empty string"))?;
            Ok(ToolSpec {
                name: name.to_string(),
                parameters: f
                    .get("parameters")
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
        })
        .collect()
}

/// Tool definitions, names and arguments are written by the template as template text (special
/// tokens parsed), so they may not hold special-token text.
fn refuse_special_text(req: &ChatRequest<'_>, specials: &[String]) -> Result<(), TemplateError> {
    let found = |s: &str| {
        specials
            .iter()
            .find(|sp| !sp.is_empty() && s.contains(sp.as_str()))
    };
    for (i, t) in req.tools.iter().enumerate() {
        if let Some(sp) = found(&t.to_string()) {
            return Err(TemplateError::Unsupported(format!(
                "tools[{i}] contains the special token {sp:?}"
            )));
        }
    }
    for (i, m) in req.messages.iter().enumerate() {
        let texts = m
            .tool_calls
            .iter()
            .flat_map(|c| [&c.id, &c.name, &c.arguments])
            .chain(m.name.iter())
            .chain(m.tool_call_id.iter());
        for t in texts {
            if let Some(sp) = found(t) {
                return Err(TemplateError::Unsupported(format!(
                    "messages[{i}] contains the special token {sp:?} outside its content"
                )));
            }
        }
    }
    Ok(())
}

/// Prefill and grammar that make the reply one call to one of `tools`.
fn forced_call(
    format: ChatFormat,
    tools: &[&ToolSpec],
) -> Result<(String, Option<String>), TemplateError> {
    let schema_err =
        |e: grammar::GrammarError| TemplateError::Unsupported(format!("tools: parameters: {e}"));
    let mut g = GrammarBuilder::default();
    let skip_think = match format.reasoning {
        ReasoningFormat::Think {
            starts_in_reasoning: true,
        } => "</think>\n\n",
        _ => "",
    };
    if format.reasoning == ReasoningFormat::Harmony {
        let [tool] = tools else {
            return Err(TemplateError::Unsupported(
                "tool_choice: \"required\" with several tools is not supported for this model; name the function".into(),
            ));
        };
        let args = g.schema(&tool.parameters).map_err(schema_err)?;
        let prefill = format!(
            "<|channel|>commentary to=functions.{} <|constrain|>json<|message|>",
            tool.name
        );
        return Ok((prefill, Some(g.finish(&args))));
    }
    let (prefill, args_key, close) = match format.tools {
        Some(ToolFormat::Llama3Json) => ("{\"name\": \"", "parameters", "}"),
        _ => ("<tool_call>\n{\"name\": \"", "arguments", "}\n</tool_call>"),
    };
    let mut alts = Vec::new();
    for tool in tools {
        let args = g.schema(&tool.parameters).map_err(schema_err)?;
        alts.push(format!(
            "{} {args}",
            literal(&format!("{}\", \"{args_key}\": ", tool.name))
        ));
    }
    let root = format!("( {} ) {}", alts.join(" | "), literal(close));
    Ok((format!("{skip_think}{prefill}"), Some(g.finish(&root))))
}

/// Prefill and grammar for JSON output (none for text).
fn json_output(
    format: ChatFormat,
    output: &OutputFormat,
) -> Result<(String, Option<String>), TemplateError> {
    let grammar = match output {
        OutputFormat::Text => return Ok((String::new(), None)),
        OutputFormat::JsonObject => grammar::json_object_grammar(""),
        OutputFormat::JsonSchema(schema) => grammar::schema_grammar(schema, "")
            .map_err(|e| TemplateError::Unsupported(format!("response_format.json_schema: {e}")))?,
    };
    // The answer is constrained, not the reasoning: skip to the answer.
    let prefill = match format.reasoning {
        ReasoningFormat::Harmony => "<|channel|>final<|message|>",
        ReasoningFormat::Think {
            starts_in_reasoning: true,
        } => "</think>\n\n",
        _ => "",
    };
    Ok((prefill.to_string(), Some(grammar)))
}

#[cfg(test)]
mod tests;
