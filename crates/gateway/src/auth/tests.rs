use std::io::Write;
use std::time::{Duration, Instant};

use moe_common::pb::{GenerateRequest, LatencyClass};
use tonic::Code;

use super::*;

const ALICE: &str = "alice-key-0123456789abcdef";
const BATCH: &str = "batch-key-0123456789abcdef";

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write");
    f
}

fn keys(text: &str) -> (ApiKeys, tempfile::NamedTempFile) {
    let f = file(text);
    (ApiKeys::load(f.path()).expect("keys load"), f)
}

fn req(model: &str, class: LatencyClass, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "hi".into(),
        model: model.into(),
        latency_class: class as i32,
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn parses_bare_keys_comments_and_settings() {
    let specs = parse_keys(&format!(
        "# comment\n\n  {ALICE}   # trailing comment\n{BATCH} name=batch models=a,b classes=batch tokens_per_minute=100 max_concurrent=2\n"
    ))
    .expect("parses");
    assert_eq!(specs.len(), 2);
    assert_eq!(specs[0].models, None);
    assert!(specs[0].name.starts_with("key-") && specs[0].name.len() == 12);
    assert_eq!(specs[1].name, "batch");
    assert_eq!(
        specs[1].models,
        Some(vec!["a".to_string(), "b".to_string()])
    );
    assert_eq!(
        specs[1].classes,
        Some(vec![moe_common::LatencyClass::Batch])
    );
    assert_eq!(specs[1].tokens_per_minute, Some(100));
    assert_eq!(specs[1].max_concurrent, Some(2));
}

#[test]
fn bad_lines_fail_the_file_naming_the_line_but_never_the_key() {
    let cases = [
        ("short", "shorter than"),
        (&format!("{ALICE} colour=red") as &str, "unknown setting"),
        (&format!("{ALICE} tokens_per_minute=0"), "tokens_per_minute"),
        (&format!("{ALICE} max_concurrent=-1"), "max_concurrent"),
        (&format!("{ALICE} classes=urgent"), "unknown class"),
        (&format!("{ALICE} loose"), "setting=value"),
        (&format!("{ALICE}\n{ALICE}"), "same key"),
        (&format!("{ALICE} name=x\n{BATCH} name=x"), "already used"),
        ("# only comments\n", "no key"),
    ];
    for (text, expected) in cases {
        let e = parse_keys(text).expect_err(expected).to_string();
        assert!(e.contains(expected), "{e:?} should mention {expected}");
        assert!(
            !e.contains(ALICE) && !e.contains(BATCH),
            "{e:?} leaks a key"
        );
    }
}

#[test]
fn bearer_takes_the_key_of_a_bearer_authorization() {
    assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
    assert_eq!(bearer(Some("bearer   abc ")), Some("abc"));
    assert_eq!(bearer(Some("Basic abc")), None);
    assert_eq!(bearer(Some("Bearer ")), None);
    assert_eq!(bearer(Some("abc")), None);
    assert_eq!(bearer(None), None);
}

#[test]
fn bucket_refills_over_a_minute_and_says_how_long_to_wait() {
    let t0 = Instant::now();
    let mut b = Bucket::new(60, t0);
    assert_eq!(b.take(60, t0), Ok(()));
    let wait = b.take(30, t0).expect_err("empty");
    assert!((wait.as_secs_f64() - 30.0).abs() < 0.01, "{wait:?}");
    assert_eq!(b.take(30, t0 + Duration::from_secs(30)), Ok(()));
    b.refund(10, t0 + Duration::from_secs(30));
    assert_eq!(b.take(10, t0 + Duration::from_secs(30)), Ok(()));
    b.refund(1000, t0 + Duration::from_secs(600));
    assert!(
        b.take(61, t0 + Duration::from_secs(600)).is_err(),
        "capped at a minute"
    );
}

#[test]
fn missing_and_unknown_keys_are_unauthenticated() {
    let (k, _f) = keys(ALICE);
    let r = req("", LatencyClass::Interactive, 4);
    assert_eq!(
        k.admit(None, &r).err().map(|s| s.code()),
        Some(Code::Unauthenticated)
    );
    let wrong = k
        .admit(Some("alice-key-0123456789abcdeX"), &r)
        .err()
        .expect("wrong key");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(k.admit(Some(ALICE), &r).is_ok());
}

#[test]
fn model_and_class_allowances_are_permission_denied() {
    let (k, _f) = keys(&format!("{BATCH} name=b models=m1 classes=batch"));
    let denied = |r: GenerateRequest| k.admit(Some(BATCH), &r).err().map(|s| s.code());
    assert_eq!(
        denied(req("m2", LatencyClass::Batch, 4)),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        denied(req("", LatencyClass::Batch, 4)),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        denied(req("m1", LatencyClass::Interactive, 4)),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        denied(req("m1", LatencyClass::Unspecified, 4)),
        Some(Code::PermissionDenied),
        "unspecified is interactive"
    );
    assert_eq!(denied(req("m1", LatencyClass::Batch, 4)), None);
}

#[test]
fn over_the_rate_is_resource_exhausted_with_a_retry_hint_and_unused_tokens_come_back() {
    let (k, _f) = keys(&format!("{ALICE} name=a tokens_per_minute=100"));
    let g = k
        .admit(Some(ALICE), &req("", LatencyClass::Interactive, 80))
        .expect("first");
    let s = tonic::Status::from(
        k.admit(Some(ALICE), &req("", LatencyClass::Interactive, 80))
            .err()
            .expect("over the rate"),
    );
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("retry-after"), "{}", s.message());
    let ms: u64 = s
        .metadata()
        .get(RETRY_AFTER_MS)
        .expect("hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (30_000..=40_000).contains(&ms),
        "about 36 s for 60 tokens: {ms}"
    );
    g.generated(10);
    drop(g);
    assert!(
        k.admit(Some(ALICE), &req("", LatencyClass::Interactive, 80))
            .is_ok(),
        "70 unused tokens were refunded"
    );
    let too_big = k
        .admit(Some(ALICE), &req("", LatencyClass::Interactive, 101))
        .err()
        .unwrap();
    assert_eq!(too_big.code(), Code::InvalidArgument);
}

#[test]
fn concurrency_is_limited_per_key() {
    let (k, _f) = keys(&format!("{ALICE} max_concurrent=1\n{BATCH}"));
    let r = req("", LatencyClass::Interactive, 4);
    let g = k.admit(Some(ALICE), &r).expect("first stream");
    let s = tonic::Status::from(k.admit(Some(ALICE), &r).err().expect("second stream"));
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.metadata().get(RETRY_AFTER_MS).is_some());
    assert!(
        k.admit(Some(BATCH), &r).is_ok(),
        "other keys are not affected"
    );
    drop(g);
    assert!(k.admit(Some(ALICE), &r).is_ok());
}

#[test]
fn reload_swaps_keys_and_keeps_a_bad_file_out() {
    let (k, f) = keys(ALICE);
    std::fs::write(f.path(), BATCH).unwrap();
    assert_eq!(k.reload(), Ok(1));
    let r = req("", LatencyClass::Interactive, 4);
    assert!(k.admit(Some(ALICE), &r).is_err(), "removed key refused");
    assert!(k.admit(Some(BATCH), &r).is_ok());
    std::fs::write(f.path(), "garbage").unwrap();
    assert!(k.reload().is_err());
    assert!(
        k.admit(Some(BATCH), &r).is_ok(),
        "previous keys stay in force"
    );
}
