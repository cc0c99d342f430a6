//! Which `moe.v1` request fields this build implements. Fields the worker does not act on are
//! refused (INVALID_ARGUMENT naming them) by `request::validate`, on gateways and workers alike,
//! so that no option is silently ignored. A field moves out of here when it is implemented.

use crate::pb::GenerateRequest;

/// The first field of `req` that is set to something this build does not implement.
pub fn unimplemented_field(req: &GenerateRequest) -> Option<String> {
    if let Some(s) = &req.sampling {
        // Out of OpenAI's range: refused rather than clamped.
        if !(-2.0..=2.0).contains(&s.presence_penalty) {
            return Some("sampling.presence_penalty outside -2..2".into());
        }
        if !(-2.0..=2.0).contains(&s.frequency_penalty) {
            return Some("sampling.frequency_penalty outside -2..2".into());
        }
    }
    let checks = [
        (
            req.top_logprobs > 20 || (req.top_logprobs > 0 && !req.logprobs),
            "top_logprobs (0-20, with logprobs)",
        ),
        (
            !req.prompt.is_empty() && (req.response_format.is_some() || !req.tools_json.is_empty()),
            "response_format/tools_json (chat requests only)",
        ),
    ];
    checks
        .into_iter()
        .find(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::SamplingParams;
    use crate::pb::v1::ResponseFormat;

    #[test]
    fn plain_and_chat_requests_use_nothing_unimplemented() {
        let req = GenerateRequest {
            prompt: "x".into(),
            parallel_tool_calls: Some(false),
            sampling: Some(SamplingParams::default()),
            ..Default::default()
        };
        assert_eq!(unimplemented_field(&req), None);
        let chat = GenerateRequest {
            tools_json: "[]".into(),
            response_format: Some(ResponseFormat::default()),
            ..Default::default()
        };
        assert_eq!(unimplemented_field(&chat), None);
    }

    #[test]
    fn batch_invariant_is_implemented_not_refused() {
        // Served by placement (gateways) and by the worker's own check, never refused as unknown.
        for prompt in ["x", ""] {
            let req = GenerateRequest {
                prompt: prompt.into(),
                batch_invariant: true,
                ..Default::default()
            };
            assert_eq!(unimplemented_field(&req), None);
        }
        let req = GenerateRequest {
            prompt: "x".into(),
            max_tokens: 4,
            batch_invariant: true,
            ..Default::default()
        };
        let limits = crate::request::RequestLimits::default();
        for allow_resume in [false, true] {
            assert_eq!(
                crate::request::validate(&req, &limits, allow_resume),
                Ok(())
            );
        }
    }

    #[test]
    fn unimplemented_fields_are_named() {
        let req = GenerateRequest {
            top_logprobs: 2,
            ..Default::default()
        };
        assert!(
            unimplemented_field(&req)
                .unwrap()
                .starts_with("top_logprobs")
        );
        // One call at most with `tool_choice` auto: implemented (the reply is cut after it).
        let req = GenerateRequest {
            tools_json: "[{}]".into(),
            parallel_tool_calls: Some(false),
            ..Default::default()
        };
        assert_eq!(unimplemented_field(&req), None);
        let req = GenerateRequest {
            prompt: "x".into(),
            tools_json: "[{}]".into(),
            ..Default::default()
        };
        assert!(
            unimplemented_field(&req)
                .unwrap()
                .starts_with("response_format")
        );
    }
}
