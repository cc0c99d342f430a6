//! Which `moe.v1` request fields this build implements. Fields the worker does not act on are
//! refused (INVALID_ARGUMENT naming them) by `request::validate`, on gateways and workers alike,
//! so that no option is silently ignored. A field moves out of here when it is implemented.

use crate::pb::GenerateRequest;
use crate::pb::v1::response_format::Type as FormatType;
use crate::pb::v1::tool_choice::Mode as ToolMode;

/// The first field of `req` that is set to something this build does not implement.
pub fn unimplemented_field(req: &GenerateRequest) -> Option<String> {
    for (i, m) in req.messages.iter().enumerate() {
        let field = if !m.name.is_empty() {
            "name"
        } else if !m.tool_calls.is_empty() {
            "tool_calls"
        } else if !m.tool_call_id.is_empty() {
            "tool_call_id"
        } else if !m.reasoning_content.is_empty() {
            "reasoning_content"
        } else {
            continue;
        };
        return Some(format!("messages[{i}].{field}"));
    }
    if let Some(s) = &req.sampling {
        if s.presence_penalty != 0.0 {
            return Some("sampling.presence_penalty".into());
        }
        if s.frequency_penalty != 0.0 {
            return Some("sampling.frequency_penalty".into());
        }
    }
    let checks = [
        (
            req.response_format
                .as_ref()
                .is_some_and(|f| f.r#type() != FormatType::Text || !f.json_schema.is_empty()),
            "response_format",
        ),
        (!req.tools_json.is_empty(), "tools_json"),
        (
            req.tool_choice
                .as_ref()
                .is_some_and(|c| c.mode() != ToolMode::Auto || !c.function_name.is_empty()),
            "tool_choice",
        ),
        (!req.reasoning_effort.is_empty(), "reasoning_effort"),
        (req.raw_output, "raw_output"),
        (req.logprobs, "logprobs"),
        (req.top_logprobs != 0, "top_logprobs"),
    ];
    checks
        .into_iter()
        .find(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::v1::ResponseFormat;
    use crate::pb::{ChatMessage, SamplingParams};

    #[test]
    fn plain_requests_use_nothing_unimplemented() {
        let req = GenerateRequest {
            prompt: "x".into(),
            parallel_tool_calls: Some(false),
            sampling: Some(SamplingParams::default()),
            response_format: Some(ResponseFormat::default()),
            ..Default::default()
        };
        assert_eq!(unimplemented_field(&req), None);
    }

    #[test]
    fn unimplemented_fields_are_named() {
        let req = GenerateRequest {
            messages: vec![
                ChatMessage::default(),
                ChatMessage {
                    tool_call_id: "c".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            unimplemented_field(&req).as_deref(),
            Some("messages[1].tool_call_id")
        );
        let req = GenerateRequest {
            logprobs: true,
            ..Default::default()
        };
        assert_eq!(unimplemented_field(&req).as_deref(), Some("logprobs"));
    }
}
