use super::*;

fn chat(body: Value) -> Result<Mapped, ApiError> {
    chat_request(
        serde_json::from_value(body).unwrap(),
        LatencyClass::Interactive,
    )
}

fn completion(body: Value) -> Result<Mapped, ApiError> {
    completion_request(
        serde_json::from_value(body).unwrap(),
        LatencyClass::Interactive,
    )
}

#[test]
fn chat_request_maps_every_supported_field() {
    let m = chat(json!({
        "model": "smollm2-moe-4x2",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null},
        ],
        "max_completion_tokens": 12,
        "max_tokens": 99,
        "temperature": 0,
        "top_p": 0.9,
        "stop": ["\n\n", "END"],
        "seed": 7,
        "stream": true,
        "stream_options": {"include_usage": true},
        "n": 1,
        "presence_penalty": 0,
        "logprobs": false,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "tools": [],
        "store": false,
        "user": "no effect",
    }))
    .unwrap();
    let r = &m.request;
    assert_eq!(r.model, "smollm2-moe-4x2");
    let msgs: Vec<_> = r
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    assert_eq!(
        msgs,
        [
            ("system", "Be brief."),
            ("user", "Hi\nthere"),
            ("assistant", "")
        ]
    );
    assert_eq!(
        r.max_tokens, 12,
        "max_completion_tokens wins over max_tokens"
    );
    let s = r.sampling.unwrap();
    assert_eq!((s.temperature, s.top_p, s.seed), (0.0, 0.9, Some(7)));
    assert_eq!(r.stop, ["\n\n", "END"]);
    assert!(r.prompt.is_empty());
    assert_eq!(r.latency_class, LatencyClass::Interactive as i32);
    assert!(m.stream && m.include_usage);
}

#[test]
fn absent_fields_take_openai_defaults() {
    let m = completion(json!({"prompt": "The capital of France is"})).unwrap();
    let r = &m.request;
    assert_eq!(r.prompt, "The capital of France is");
    assert_eq!(r.max_tokens, DEFAULT_MAX_TOKENS);
    assert_eq!(r.sampling.unwrap().temperature, 1.0);
    assert_eq!(r.sampling.unwrap().seed, None);
    assert!(r.model.is_empty() && r.stop.is_empty());
    assert!(!m.stream && !m.include_usage);
}

#[test]
fn include_usage_needs_a_stream() {
    let m = completion(json!({"prompt": "x", "stream_options": {"include_usage": true}})).unwrap();
    assert!(!m.include_usage);
}

#[test]
fn prompt_is_a_string_or_one_string_in_an_array() {
    assert_eq!(
        completion(json!({"prompt": ["one"], "stop": "."}))
            .unwrap()
            .request
            .stop,
        ["."]
    );
    assert_eq!(
        completion(json!({"prompt": ["one"]}))
            .unwrap()
            .request
            .prompt,
        "one"
    );
    for bad in [
        json!(["a", "b"]),
        json!([1, 2, 3]),
        json!([]),
        json!(null),
        json!(5),
    ] {
        let e = completion(json!({"prompt": bad})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"), "{bad}");
        assert_eq!(e.status.as_u16(), 400);
    }
}

#[test]
fn unsupported_values_are_refused_naming_the_parameter() {
    let msgs = json!([{"role": "user", "content": "x"}]);
    for (field, value) in [("store", json!(true)), ("prompt", json!("x"))] {
        let mut body = json!({"messages": msgs});
        body[field] = value;
        let e = chat(body).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(field)));
        assert_eq!(e.code, Some("unsupported_parameter"), "{field}");
    }
    for (field, value) in [
        ("response_format", json!({"type": "json_object"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("tool_choice", json!("required")),
        ("reasoning_effort", json!("low")),
    ] {
        let mut body = json!({"prompt": "x"});
        body[field] = value;
        let e = completion(body).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(field));
    }
    let m = completion(json!({"prompt": "x", "logprobs": 3})).unwrap();
    assert_eq!((m.request.logprobs, m.request.top_logprobs), (true, 3));
    let m = chat(json!({"messages": msgs, "logprobs": true, "top_logprobs": 2})).unwrap();
    assert_eq!((m.request.logprobs, m.request.top_logprobs), (true, 2));
    let e = chat(json!({"messages": msgs, "top_logprobs": 2})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("top_logprobs"));
    let e = completion(json!({"prompt": "x", "logprobs": 21})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("logprobs"));
    let e = completion(json!({"prompt": "x", "messages": msgs})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"));
    assert!(completion(json!({"prompt": "x", "logprobs": 0})).is_ok());
}

#[test]
fn unknown_fields_are_refused_by_the_body_parser() {
    let e = moe_common::chat::strict::from_slice::<Body>(
        br#"{"messages": [{"role": "user", "content": "x", "audio": "bob"}], "logit_bias": {}}"#,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "unsupported field(s): messages[0].audio, logit_bias"
    );
}

#[test]
fn only_one_choice_is_supported() {
    let e = chat(json!({"messages": [{"role": "user", "content": "x"}], "n": 2})).unwrap_err();
    assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some("n")));
}

#[test]
fn chat_without_messages_or_with_image_parts_is_refused() {
    let e = chat(json!({"messages": []})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages"));
    let image = json!([{"type": "image_url", "image_url": {"url": "x"}}]);
    let e = chat(json!({"messages": [{"role": "user", "content": image}]})).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("messages[0].content"));
}

#[test]
fn latency_class_header_wins_over_metadata_and_defaults_to_interactive() {
    let batch = json!({"latency_class": "batch"});
    let meta = batch.as_object();
    assert_eq!(latency_class(None, None), Ok(LatencyClass::Interactive));
    assert_eq!(latency_class(None, meta), Ok(LatencyClass::Batch));
    assert_eq!(
        latency_class(Some(" Interactive "), meta),
        Ok(LatencyClass::Interactive)
    );
    assert_eq!(latency_class(Some("BATCH"), None), Ok(LatencyClass::Batch));
    let e = latency_class(Some("urgent"), None).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("x-moe-latency-class"));
    let e = latency_class(None, json!({"latency_class": 2}).as_object()).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("metadata.latency_class"));
    assert_eq!(
        latency_class(None, json!({"user": "x"}).as_object()),
        Ok(LatencyClass::Interactive)
    );
}

#[test]
fn finish_reasons_map_to_openai_names() {
    assert_eq!(finish_reason(FinishReason::Unspecified as i32), None);
    assert_eq!(finish_reason(FinishReason::Stop as i32), Some("stop"));
    assert_eq!(finish_reason(FinishReason::Length as i32), Some("length"));
    assert_eq!(finish_reason(FinishReason::Cancelled as i32), Some("stop"));
    assert_eq!(finish_reason(42), None);
}

fn shape(kind: Kind) -> Shape {
    Shape::new(kind, 1_700_000_000, "m".into())
}

fn delta(text: &str) -> GenerateResponse {
    GenerateResponse {
        text: text.into(),
        ..Default::default()
    }
}

fn last(text: &str) -> GenerateResponse {
    GenerateResponse {
        text: text.into(),
        finish_reason: FinishReason::Length as i32,
        usage: Some(Usage {
            prompt_tokens: 5,
            completion_tokens: 8,
            cached_prompt_tokens: 2,
        }),
        ..Default::default()
    }
}

#[test]
fn ids_carry_the_endpoint_prefix() {
    assert!(shape(Kind::Chat).id.starts_with("chatcmpl-"));
    assert!(shape(Kind::Completion).id.starts_with("cmpl-"));
    assert_ne!(shape(Kind::Chat).id, shape(Kind::Chat).id);
}

#[test]
fn chat_chunks_open_with_the_role_and_close_with_the_finish_reason() {
    let s = shape(Kind::Chat);
    let first = s.chunk(&delta("Par"), true, false);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["model"], "m");
    assert_eq!(first["created"], 1_700_000_000);
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": "Par"})
    );
    assert_eq!(first["choices"][0]["finish_reason"], Value::Null);
    assert!(first.get("usage").is_none());
    let next = s.chunk(&delta("is"), false, true);
    assert_eq!(next["choices"][0]["delta"], json!({"content": "is"}));
    assert_eq!(next["usage"], Value::Null);
    let end = s.chunk(&last(""), false, false);
    assert_eq!(end["choices"][0]["delta"], json!({}));
    assert_eq!(end["choices"][0]["finish_reason"], "length");
}

#[test]
fn completion_chunks_carry_text() {
    let s = shape(Kind::Completion);
    let c = s.chunk(&last(" Paris"), true, false);
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["text"], " Paris");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
}

#[test]
fn usage_chunk_has_no_choices() {
    let u = shape(Kind::Chat).usage_chunk(&last("").usage.unwrap(), "");
    assert_eq!(u["choices"], json!([]));
    assert_eq!(
        u["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13,
               "prompt_tokens_details": {"cached_tokens": 2}})
    );
}

#[test]
fn whole_completions_have_message_or_text_and_usage() {
    let usage = last("").usage.unwrap();
    let reply = |t: &str| Reply {
        text: t.into(),
        ..Default::default()
    };
    let c = shape(Kind::Chat).complete(&reply("Paris."), "stop", &usage, "");
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(
        c["choices"][0]["message"],
        json!({"role": "assistant", "content": "Paris."})
    );
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    assert_eq!(c["usage"]["total_tokens"], 13);
    let c = shape(Kind::Completion).complete(&reply(" Paris"), "length", &usage, "");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["choices"][0]["text"], " Paris");
}

#[test]
fn batch_invariant_is_accepted_on_both_endpoints_and_reaches_the_request() {
    for v in [true, false] {
        let m =
            chat(json!({"messages": [{"role": "user", "content": "Hi"}], "batch_invariant": v}))
                .unwrap();
        assert_eq!(m.request.batch_invariant, v);
        let m = completion(json!({"prompt": "Hi", "batch_invariant": v})).unwrap();
        assert_eq!(m.request.batch_invariant, v);
    }
    let m = completion(json!({"prompt": "Hi"})).unwrap();
    assert!(!m.request.batch_invariant, "off unless asked for");
    // Through the strict parser the HTTP front uses: a known field, not an unsupported one.
    let body: Body = moe_common::chat::strict::from_slice(
        br#"{"prompt": "Hi", "seed": 3, "temperature": 0.7, "batch_invariant": true}"#,
    )
    .unwrap();
    assert_eq!(body.batch_invariant, Some(true));
    // The mapped request passes the field-support checks of gateways and workers.
    let m = completion_request(body, LatencyClass::Interactive).unwrap();
    moe_common::request::validate(&m.request, &Default::default(), false).unwrap();
    // Not a boolean: a 400, not a silent default.
    assert!(
        moe_common::chat::strict::from_slice::<Body>(br#"{"batch_invariant": "yes"}"#).is_err()
    );
}

#[test]
fn the_system_fingerprint_is_on_the_final_chunk_the_usage_chunk_and_whole_completions() {
    let fp = "fp_0123456789abcdef";
    let mut end = last("");
    end.system_fingerprint = fp.into();
    for kind in [Kind::Chat, Kind::Completion] {
        let s = shape(kind);
        // Not known before the end of the stream (it may migrate): absent.
        assert!(
            s.chunk(&delta("Par"), true, true)
                .get("system_fingerprint")
                .is_none()
        );
        assert_eq!(s.chunk(&end, false, true)["system_fingerprint"], fp);
        assert_eq!(
            s.usage_chunk(&end.usage.unwrap(), fp)["system_fingerprint"],
            fp
        );
        let reply = Reply::default();
        assert_eq!(
            s.complete(&reply, "length", &end.usage.unwrap(), fp)["system_fingerprint"],
            fp
        );
        // A worker older than the field sends none: null, as OpenAI's optional field.
        assert_eq!(
            s.chunk(&last(""), false, false)["system_fingerprint"],
            Value::Null
        );
        assert_eq!(
            s.complete(&reply, "length", &end.usage.unwrap(), "")["system_fingerprint"],
            Value::Null
        );
    }
}
