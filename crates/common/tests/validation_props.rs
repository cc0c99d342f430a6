//! Property tests of request validation against hostile input: arbitrary requests (NaN, infinite,
//! negative and huge sampling values; huge, empty and control-character strings; many messages
//! and stop strings) never panic, and are refused exactly when a rule below is broken. The rules
//! are restated here independently of `validate`. `PROPTEST_CASES` sets the number of cases
//! (256 by default). The corpus in tests/corpus/ replays known hostile requests.

mod corpus;

use moe_common::codec::DecodeFailure;
use moe_common::pb::{ChatMessage, GenerateRequest, LatencyClass, SamplingParams};
use moe_common::request::{RequestLimits, SAMPLING_RANGES, validate};
use proptest::prelude::*;
use prost::Message;

/// Small limits, so generated requests fall on both sides of every boundary.
fn small_limits() -> RequestLimits {
    RequestLimits {
        max_prompt_bytes: 48,
        max_tokens: 100,
        max_messages: 4,
        max_role_bytes: 8,
        max_stop_strings: 3,
        max_stop_bytes: 6,
        max_request_id_chars: 10,
        max_model_chars: 10,
        max_message_bytes: 1 << 10,
    }
}

/// The rules, restated: each broken one is named.
fn broken_rules(r: &GenerateRequest, l: &RequestLimits, allow_resume: bool) -> Vec<&'static str> {
    let mut b = Vec::new();
    let control = |s: &str| s.chars().any(|c| c.is_control());
    if r.prompt.is_empty() == r.messages.is_empty() {
        b.push("exactly one of prompt and messages");
    }
    if r.prompt.len() > l.max_prompt_bytes {
        b.push("prompt size");
    }
    if r.prompt.contains('\0') {
        b.push("NUL in prompt");
    }
    if r.messages.len() > l.max_messages {
        b.push("message count");
    }
    for m in &r.messages {
        if m.role.trim().is_empty() || m.role.len() > l.max_role_bytes || control(&m.role) {
            b.push("role");
        }
        if m.content.contains('\0') {
            b.push("NUL in content");
        }
    }
    if r.messages.iter().map(|m| m.content.len()).sum::<usize>() > l.max_prompt_bytes {
        b.push("messages size");
    }
    if r.max_tokens == 0 || r.max_tokens > l.max_tokens {
        b.push("max_tokens");
    }
    if r.stop.len() > l.max_stop_strings
        || r.stop
            .iter()
            .any(|s| s.is_empty() || s.len() > l.max_stop_bytes)
    {
        b.push("stop");
    }
    if r.request_id.chars().count() > l.max_request_id_chars || control(&r.request_id) {
        b.push("request_id");
    }
    if r.model.chars().count() > l.max_model_chars || control(&r.model) {
        b.push("model");
    }
    if !(0..=2).contains(&r.latency_class) {
        b.push("latency_class");
    }
    if !r.resume_token_ids.is_empty()
        && (!allow_resume || r.resume_token_ids.len() >= r.max_tokens as usize)
    {
        b.push("resume_token_ids");
    }
    if let Some(s) = &r.sampling {
        let values = [s.temperature, s.top_p, s.min_p, s.repeat_penalty];
        for ((_, lo, hi), v) in SAMPLING_RANGES.iter().zip(values) {
            if v.is_nan() || v.is_infinite() || v < *lo || v > *hi {
                b.push("sampling range");
            }
        }
        if s.top_k < 0 {
            b.push("top_k");
        }
    }
    b
}

/// Strings that favour trouble: NUL, escapes, newlines, combining marks, emoji, RTL override.
fn text(max_chars: usize) -> impl Strategy<Value = String> {
    let odd = prop_oneof![
        Just('\0'),
        Just('\n'),
        Just('\u{1b}'),
        Just('\u{202e}'),
        Just('\u{301}'),
        Just('é'),
        Just('😀'),
        Just(' '),
    ];
    let ch = prop_oneof![4 => proptest::char::range('a', 'z'), 2 => odd, 1 => any::<char>()];
    prop_oneof![
        1 => Just(String::new()),
        6 => proptest::collection::vec(ch, 0..=max_chars).prop_map(|v| v.into_iter().collect()),
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(-0.0f32),
        Just(0.0f32),
        Just(1.0f32),
        Just(f32::MAX),
        Just(f32::MIN),
        Just(f32::MIN_POSITIVE),
        -2.0f32..120.0,
        any::<f32>(),
    ]
}

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (
        float(),
        prop_oneof![Just(0), -3i32..50, any::<i32>()],
        float(),
        float(),
        float(),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(temperature, top_k, top_p, min_p, repeat_penalty, seed)| SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                repeat_penalty,
                seed,
                ..Default::default()
            },
        )
}

fn request() -> impl Strategy<Value = GenerateRequest> {
    let message = (text(10), text(20)).prop_map(|(role, content)| ChatMessage {
        role,
        content,
        ..Default::default()
    });
    (
        text(60),
        prop_oneof![2 => Just(vec![]), 1 => proptest::collection::vec(message, 0..6)],
        prop_oneof![0u32..120, any::<u32>()],
        proptest::option::of(sampling()),
        proptest::collection::vec(text(8), 0..5),
        prop_oneof![4 => 0i32..3, 1 => any::<i32>()],
        text(12),
        text(12),
        prop_oneof![3 => Just(vec![]), 1 => proptest::collection::vec(any::<u32>(), 0..4)],
    )
        .prop_map(
            |(prompt, messages, max_tokens, sampling, stop, class, model, request_id, resume)| {
                GenerateRequest {
                    prompt,
                    messages,
                    max_tokens,
                    sampling,
                    stop,
                    latency_class: class,
                    model,
                    request_id,
                    resume_token_ids: resume,
                    ..Default::default()
                }
            },
        )
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn refused_exactly_when_a_rule_is_broken(r in request(), allow_resume in any::<bool>()) {
        let limits = small_limits();
        let broken = broken_rules(&r, &limits, allow_resume);
        match validate(&r, &limits, allow_resume) {
            Ok(()) => prop_assert!(broken.is_empty(), "accepted although {broken:?}"),
            Err(e) => {
                prop_assert!(!broken.is_empty(), "refused ({e}) though no rule is broken");
                // The message names the rule; it never echoes the client's text back.
                prop_assert!(e.0.len() < 200, "message too long: {}", e.0);
            }
        }
    }

    #[test]
    fn default_limits_agree_with_the_rules_too(r in request()) {
        let limits = RequestLimits::default();
        let broken = broken_rules(&r, &limits, false);
        prop_assert_eq!(validate(&r, &limits, false).is_ok(), broken.is_empty());
    }

    #[test]
    fn requests_survive_the_wire_and_validate_the_same(r in request()) {
        let bytes = r.encode_to_vec();
        let back = GenerateRequest::decode(bytes.as_slice()).expect("own encoding decodes");
        let limits = small_limits();
        prop_assert_eq!(validate(&back, &limits, false).is_ok(), validate(&r, &limits, false).is_ok());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(r) = GenerateRequest::decode(bytes.as_slice()) {
            let _ = validate(&r, &RequestLimits::default(), true);
        }
    }
}

#[test]
fn decode_failures_of_requests_are_invalid_argument() {
    let s = <GenerateRequest as DecodeFailure>::status("bad".into());
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    let s = <moe_common::pb::GenerateResponse as DecodeFailure>::status("bad".into());
    assert_eq!(
        s.code(),
        tonic::Code::Internal,
        "a worker's bad response is not the client's fault"
    );
}

#[test]
fn hostile_corpus_is_refused_and_the_rest_accepted() {
    let cases = corpus::load();
    assert!(cases.len() >= 30, "corpus has {} cases", cases.len());
    for case in cases {
        let outcome = GenerateRequest::decode(case.bytes.as_slice())
            .map_err(|e| format!("decode: {e}"))
            .and_then(|r| validate(&r, &RequestLimits::default(), false).map_err(|e| e.0));
        assert_eq!(
            outcome.is_err(),
            case.invalid,
            "{}: got {outcome:?}",
            case.name
        );
    }
}

#[test]
fn latency_class_values_match_the_rule() {
    for c in [
        LatencyClass::Unspecified,
        LatencyClass::Interactive,
        LatencyClass::Batch,
    ] {
        assert!((0..=2).contains(&(c as i32)));
    }
}
