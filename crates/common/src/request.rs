//! Validation of client requests, shared by gateway and worker so both refuse the same input
//! with the same precise INVALID_ARGUMENT message.

use crate::pb::{GenerateRequest, LatencyClass};

/// Limits on everything a client controls. Both binaries take them as flags; a worker's must be
/// at least its gateways' (it re-checks what they forward).
#[derive(Clone, Debug, PartialEq, clap::Args)]
pub struct RequestLimits {
    /// Largest `prompt` in bytes; also the limit on the total content of `messages`.
    #[arg(long, env = "MOE_MAX_PROMPT_BYTES", default_value_t = RequestLimits::DEFAULT.max_prompt_bytes)]
    pub max_prompt_bytes: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(
        long = "max-tokens-limit",
        env = "MOE_MAX_TOKENS_LIMIT",
        default_value_t = RequestLimits::DEFAULT.max_tokens
    )]
    pub max_tokens: u32,
    /// Most chat `messages` in one request.
    #[arg(long, env = "MOE_MAX_MESSAGES", default_value_t = RequestLimits::DEFAULT.max_messages)]
    pub max_messages: usize,
    /// Longest chat message `role`, in bytes.
    #[arg(long, env = "MOE_MAX_ROLE_BYTES", default_value_t = RequestLimits::DEFAULT.max_role_bytes)]
    pub max_role_bytes: usize,
    /// Most `stop` strings in one request.
    #[arg(long, env = "MOE_MAX_STOP_STRINGS", default_value_t = RequestLimits::DEFAULT.max_stop_strings)]
    pub max_stop_strings: usize,
    /// Longest `stop` string, in bytes.
    #[arg(long, env = "MOE_MAX_STOP_BYTES", default_value_t = RequestLimits::DEFAULT.max_stop_bytes)]
    pub max_stop_bytes: usize,
    /// Longest `request_id`, in characters.
    #[arg(long, env = "MOE_MAX_REQUEST_ID_CHARS", default_value_t = RequestLimits::DEFAULT.max_request_id_chars)]
    pub max_request_id_chars: usize,
    /// Longest `model` name, in characters.
    #[arg(long, env = "MOE_MAX_MODEL_CHARS", default_value_t = RequestLimits::DEFAULT.max_model_chars)]
    pub max_model_chars: usize,
    /// Largest encoded gRPC request message in bytes; larger ones are refused before decoding
    /// (OUT_OF_RANGE). Keep it above --max-prompt-bytes.
    #[arg(long, env = "MOE_MAX_MESSAGE_BYTES", default_value_t = RequestLimits::DEFAULT.max_message_bytes)]
    pub max_message_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits::DEFAULT
    }
}

impl RequestLimits {
    /// The defaults, written once: the flags' defaults and [`Default`] both come from here.
    pub const DEFAULT: RequestLimits = RequestLimits {
        max_prompt_bytes: 1 << 20,
        max_tokens: 32_768,
        max_messages: 256,
        max_role_bytes: 64,
        max_stop_strings: 16,
        max_stop_bytes: 256,
        max_request_id_chars: 128,
        max_model_chars: 256,
        max_message_bytes: 4 << 20,
    };

    /// Cross-field checks for the flags.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_tokens == 0 {
            return Err("--max-tokens-limit must be at least 1".into());
        }
        if self.max_message_bytes < self.max_prompt_bytes {
            return Err("--max-message-bytes must be at least --max-prompt-bytes".into());
        }
        Ok(())
    }
}

/// Inclusive ranges of the float sampling settings; NaN and infinities are refused.
pub const SAMPLING_RANGES: [(&str, f32, f32); 4] = [
    ("temperature", 0.0, 100.0),
    ("top_p", 0.0, 1.0),
    ("min_p", 0.0, 1.0),
    ("repeat_penalty", 0.0, 100.0),
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

fn invalid(msg: impl Into<String>) -> Result<(), InvalidRequest> {
    Err(InvalidRequest(msg.into()))
}

/// Control characters (NUL, escape sequences, newlines) in ids that end up in logs and headers.
fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A request that passed [`validated`], with what validation learned about it.
#[derive(Clone, Copy, Debug)]
pub struct Validated<'a> {
    pub request: &'a GenerateRequest,
    /// The request's `latency_class` (unset is interactive), known to be a valid value.
    pub class: crate::LatencyClass,
}

/// Checks a request from a client. `allow_resume` is true only on workers (gateways set
/// `resume_token_ids`; clients may not). Never panics, whatever the input.
pub fn validate(
    req: &GenerateRequest,
    limits: &RequestLimits,
    allow_resume: bool,
) -> Result<(), InvalidRequest> {
    validated(req, limits, allow_resume).map(|_| ())
}

/// [`validate`], returning the request with its latency class, so callers need not decode the
/// class again (and cannot fall back to a default for a value validation refused).
pub fn validated<'a>(
    req: &'a GenerateRequest,
    limits: &RequestLimits,
    allow_resume: bool,
) -> Result<Validated<'a>, InvalidRequest> {
    check_fields(req, limits, allow_resume)?;
    let class = crate::LatencyClass::try_from(req.latency_class)
        .map_err(|e| InvalidRequest(e.to_string()))?;
    Ok(Validated {
        request: req,
        class,
    })
}

fn check_fields(
    req: &GenerateRequest,
    limits: &RequestLimits,
    allow_resume: bool,
) -> Result<(), InvalidRequest> {
    if let Some(field) = crate::chat::support::unimplemented_field(req) {
        return invalid(format!("{field} is not supported by this server"));
    }
    let has_prompt = !req.prompt.is_empty();
    let has_messages = !req.messages.is_empty();
    match (has_prompt, has_messages) {
        (false, false) => return invalid("prompt is empty: set `prompt` or `messages`"),
        (true, true) => return invalid("set either `prompt` or `messages`, not both"),
        _ => {}
    }
    if req.prompt.len() > limits.max_prompt_bytes {
        return invalid(format!(
            "prompt is {} bytes; the limit is {}",
            req.prompt.len(),
            limits.max_prompt_bytes
        ));
    }
    if req.prompt.contains('\0') {
        return invalid("prompt contains a NUL character");
    }
    if req.messages.len() > limits.max_messages {
        return invalid(format!(
            "{} messages; the limit is {}",
            req.messages.len(),
            limits.max_messages
        ));
    }
    let mut total = 0usize;
    for (i, m) in req.messages.iter().enumerate() {
        if m.role.trim().is_empty() {
            return invalid(format!("messages[{i}].role is empty"));
        }
        if m.role.len() > limits.max_role_bytes {
            return invalid(format!(
                "messages[{i}].role is longer than {} bytes",
                limits.max_role_bytes
            ));
        }
        if has_control(&m.role) {
            return invalid(format!("messages[{i}].role contains a control character"));
        }
        if m.content.contains('\0') {
            return invalid(format!("messages[{i}].content contains a NUL character"));
        }
        total = total.saturating_add(m.content.len());
    }
    if total > limits.max_prompt_bytes {
        return invalid(format!(
            "messages total {total} bytes; the limit is {}",
            limits.max_prompt_bytes
        ));
    }
    if req.max_tokens == 0 {
        return invalid("max_tokens must be at least 1");
    }
    if req.max_tokens > limits.max_tokens {
        return invalid(format!(
            "max_tokens {} exceeds the limit {}",
            req.max_tokens, limits.max_tokens
        ));
    }
    if req.stop.len() > limits.max_stop_strings {
        return invalid(format!(
            "{} stop strings; the limit is {}",
            req.stop.len(),
            limits.max_stop_strings
        ));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() || s.len() > limits.max_stop_bytes {
            return invalid(format!(
                "stop[{i}] must be 1 to {} bytes",
                limits.max_stop_bytes
            ));
        }
    }
    if req.request_id.chars().count() > limits.max_request_id_chars {
        return invalid(format!(
            "request_id is longer than {} characters",
            limits.max_request_id_chars
        ));
    }
    if has_control(&req.request_id) {
        return invalid("request_id contains a control character");
    }
    if req.model.chars().count() > limits.max_model_chars {
        return invalid(format!(
            "model is longer than {} characters",
            limits.max_model_chars
        ));
    }
    if has_control(&req.model) {
        return invalid("model contains a control character");
    }
    if LatencyClass::try_from(req.latency_class).is_err() {
        return invalid(format!("unknown latency_class {}", req.latency_class));
    }
    if !req.resume_token_ids.is_empty() {
        if !allow_resume {
            return invalid("resume_token_ids is set by gateways only");
        }
        if req.resume_token_ids.len() >= req.max_tokens as usize {
            return invalid("resume_token_ids must be fewer than max_tokens");
        }
    }
    if let Some(s) = &req.sampling {
        let values = [s.temperature, s.top_p, s.min_p, s.repeat_penalty];
        for ((name, lo, hi), v) in SAMPLING_RANGES.into_iter().zip(values) {
            if !v.is_finite() || v < lo || v > hi {
                return invalid(format!("sampling.{name} {v} is outside [{lo}, {hi}]"));
            }
        }
        if s.top_k < 0 {
            return invalid(format!("sampling.top_k {} is negative", s.top_k));
        }
    }
    Ok(())
}

/// Parses a `grpc-timeout` header value (e.g. `100m`, `5S`) into a duration.
pub fn parse_grpc_timeout(v: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{ChatMessage, SamplingParams};

    fn ok_request() -> GenerateRequest {
        GenerateRequest {
            prompt: "hi".into(),
            max_tokens: 4,
            ..Default::default()
        }
    }

    fn check(req: &GenerateRequest) -> Result<(), InvalidRequest> {
        validate(req, &RequestLimits::default(), false)
    }

    #[test]
    fn accepts_a_plain_request() {
        assert_eq!(check(&ok_request()), Ok(()));
    }

    #[test]
    fn validated_carries_the_latency_class() {
        let mut req = ok_request();
        let limits = RequestLimits::default();
        let v = validated(&req, &limits, false).unwrap();
        assert_eq!(
            v.class,
            crate::LatencyClass::Interactive,
            "unset is interactive"
        );
        req.latency_class = crate::pb::LatencyClass::Batch as i32;
        let v = validated(&req, &limits, false).unwrap();
        assert_eq!(v.class, crate::LatencyClass::Batch);
        req.latency_class = 99;
        assert!(validated(&req, &limits, false).is_err());
    }

    #[test]
    fn flag_defaults_are_the_default_limits() {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            limits: RequestLimits,
        }
        let parsed = <Flags as clap::Parser>::try_parse_from(["x"]).unwrap();
        // Only where no MOE_MAX_* variable overrides a default in this environment.
        if std::env::vars().all(|(k, _)| !k.starts_with("MOE_MAX_")) {
            assert_eq!(parsed.limits, RequestLimits::default());
        }
    }

    #[test]
    fn rejects_each_bad_field_with_a_precise_message() {
        type Edit = Box<dyn Fn(&mut GenerateRequest)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|r| r.prompt.clear()), "prompt is empty"),
            (
                Box::new(|r| r.max_tokens = 0),
                "max_tokens must be at least 1",
            ),
            (Box::new(|r| r.max_tokens = 1 << 30), "exceeds the limit"),
            (
                Box::new(|r| {
                    r.messages.push(ChatMessage {
                        role: "".into(),
                        content: "x".into(),
                        ..Default::default()
                    })
                }),
                "not both",
            ),
            (Box::new(|r| r.stop = vec!["".into()]), "stop[0]"),
            (Box::new(|r| r.request_id = "x".repeat(200)), "request_id"),
            (Box::new(|r| r.latency_class = 7), "latency_class"),
            (Box::new(|r| r.resume_token_ids = vec![1]), "gateways only"),
            (
                Box::new(|r| {
                    r.sampling = Some(SamplingParams {
                        temperature: f32::NAN,
                        ..Default::default()
                    })
                }),
                "sampling.temperature",
            ),
            (
                Box::new(|r| {
                    r.sampling = Some(SamplingParams {
                        top_k: -1,
                        ..Default::default()
                    })
                }),
                "top_k",
            ),
        ];
        for (mutate, expected) in cases {
            let mut r = ok_request();
            mutate(&mut r);
            let err = check(&r).expect_err(expected);
            assert!(err.0.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn rejects_a_message_without_role() {
        let r = GenerateRequest {
            messages: vec![ChatMessage {
                role: " ".into(),
                content: "x".into(),
                ..Default::default()
            }],
            max_tokens: 1,
            ..Default::default()
        };
        assert!(check(&r).unwrap_err().0.contains("messages[0].role"));
    }

    #[test]
    fn parses_grpc_timeouts() {
        use std::time::Duration;
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
    }
}
