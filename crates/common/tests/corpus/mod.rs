//! The hostile-request corpus (`hostile.json` beside this file): requests as JSON, with
//! `{"repeat": "s", "times": N}` for long strings, `{"list_of": X, "times": N}` for long lists,
//! and "NaN"/"inf"/"-inf" for floats, or
//! raw protobuf bytes as hex (`raw_hex`) for what a typed client cannot send (invalid UTF-8,
//! truncated fields). Shared by crates/common/tests/validation_props.rs and the end-to-end
//! security tests (included there by path).

#![allow(dead_code)]

use std::path::PathBuf;

use moe_common::pb::{ChatMessage, GenerateRequest, SamplingParams};
use prost::Message;
use serde_json::Value;

pub struct Case {
    pub name: String,
    /// True when the request must be refused with INVALID_ARGUMENT.
    pub invalid: bool,
    /// Refused by gateways only: workers accept it from gateways (`resume_token_ids`).
    pub gateway_only: bool,
    /// The request as it goes on the wire.
    pub bytes: Vec<u8>,
}

pub fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../common/tests/corpus/hostile.json")
}

pub fn load() -> Vec<Case> {
    let text = std::fs::read_to_string(path()).expect("corpus file");
    let cases: Vec<Value> = serde_json::from_str(&text).expect("corpus is JSON");
    cases
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("name").to_string();
            let invalid = match c["expect"].as_str() {
                Some("invalid_argument") => true,
                Some("ok") => false,
                other => panic!("{name}: expect must be invalid_argument or ok, not {other:?}"),
            };
            let bytes = match (c.get("raw_hex"), c.get("request")) {
                (Some(hex), None) => unhex(hex.as_str().expect("hex string")),
                (None, Some(r)) => request(r).encode_to_vec(),
                _ => panic!("{name}: give one of raw_hex and request"),
            };
            Case {
                name,
                invalid,
                gateway_only: c["gateway_only"].as_bool().unwrap_or(false),
                bytes,
            }
        })
        .collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).expect("hex"))
        .collect()
}

/// `{"repeat": "s", "times": N}` and `{"list_of": X, "times": N}` expanded.
fn expand(v: &Value) -> Value {
    let times = v.get("times").and_then(Value::as_u64).unwrap_or(0) as usize;
    match (v.get("repeat"), v.get("list_of")) {
        (Some(Value::String(s)), None) => Value::String(s.repeat(times)),
        (None, Some(item)) => Value::Array(vec![expand(item); times]),
        _ => match v {
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), expand(v))).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(expand).collect()),
            other => other.clone(),
        },
    }
}

fn string(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn float(v: &Value, key: &str, default: f32) -> f32 {
    match v.get(key) {
        None => default,
        Some(Value::String(s)) => match s.as_str() {
            "NaN" => f32::NAN,
            "inf" => f32::INFINITY,
            "-inf" => f32::NEG_INFINITY,
            other => panic!("float {other:?}"),
        },
        Some(n) => n.as_f64().expect("float") as f32,
    }
}

fn request(r: &Value) -> GenerateRequest {
    let r = expand(r);
    let strings = |key: &str| -> Vec<String> {
        r.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().expect("string").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    GenerateRequest {
        prompt: string(&r, "prompt"),
        messages: r
            .get("messages")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|m| ChatMessage {
                        role: string(m, "role"),
                        content: string(m, "content"),
                        ..Default::default()
                    })
                    .collect()
            })
            .unwrap_or_default(),
        max_tokens: r.get("max_tokens").and_then(Value::as_u64).unwrap_or(0) as u32,
        sampling: r.get("sampling").map(|s| SamplingParams {
            temperature: float(s, "temperature", 0.0),
            top_k: s.get("top_k").and_then(Value::as_i64).unwrap_or(0) as i32,
            top_p: float(s, "top_p", 0.0),
            min_p: float(s, "min_p", 0.0),
            repeat_penalty: float(s, "repeat_penalty", 0.0),
            seed: s.get("seed").and_then(Value::as_u64),
            ..Default::default()
        }),
        stop: strings("stop"),
        latency_class: r.get("latency_class").and_then(Value::as_i64).unwrap_or(0) as i32,
        model: string(&r, "model"),
        request_id: string(&r, "request_id"),
        resume_token_ids: r
            .get("resume_token_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| t.as_u64().expect("token") as u32)
                    .collect()
            })
            .unwrap_or_default(),
        ..Default::default()
    }
}
