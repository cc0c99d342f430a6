//! The gateway's per-request drive loop against fake workers (real gRPC on 127.0.0.1, no
//! llama.cpp, no etcd: the routing state is built straight from adverts). One test per path:
//! retry before the first token, migration after N tokens, drain hand-over, retry-budget
//! exhaustion, deadline, client drop, a silent worker (idle timeout), a client that stops
//! reading, drain migrations on their own budget, outlier ejection; requests with
//! `batch_invariant` placed, migrated and refused by the workers' advertised invariance; the
//! final message the gateway writes when a worker dies after the last token (with or without
//! another worker left).

mod fake_worker;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use fake_worker::{FakeWorker, Script};
use moe_common::LatencyClass;
use moe_common::pb::{FinishReason, GenerateRequest, GenerateResponse};
use moe_common::registry::ClusterSnapshot;
use moe_common::request::RequestLimits;
use moe_gateway::RoutingState;
use moe_gateway::auth::ApiKeys;
use moe_gateway::proxy::{GatewayService, ProxyConfig};
use moe_gateway::router::OutlierConfig;
use moe_gateway::scheduler::Policy;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

type Gateway = (
    GatewayService,
    Arc<RoutingState>,
    watch::Sender<Arc<ClusterSnapshot>>,
);

/// A gateway service over these workers, each with its profile (`full` or `cpu-moe`).
fn gateway(workers: &[(&FakeWorker, &str)], request_timeout: Duration) -> Gateway {
    gateway_with(workers, request_timeout, Duration::from_secs(30), |r| r)
}

/// [`gateway`] with a stream idle timeout and routing-state settings.
fn gateway_with(
    workers: &[(&FakeWorker, &str)],
    request_timeout: Duration,
    stream_idle_timeout: Duration,
    routing: impl FnOnce(RoutingState) -> RoutingState,
) -> Gateway {
    let snapshot = ClusterSnapshot {
        revision: 1,
        workers: workers
            .iter()
            .map(|(w, profile)| (w.id.clone(), Arc::new(w.advert(profile))))
            .collect(),
        rejected: Default::default(),
    };
    let (tx, rx) = watch::channel(Arc::new(snapshot));
    let router = Arc::new(routing(RoutingState::new(rx, Policy::default())));
    let service = GatewayService::new(
        router.clone(),
        ProxyConfig {
            max_streams: 16,
            request_timeout,
            max_attempts: 3,
            stream_idle_timeout,
            first_message_timeout: stream_idle_timeout,
            limits: RequestLimits::default(),
        },
    );
    (service, router, tx)
}

fn request(max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: "hello".into(),
        max_tokens,
        latency_class: LatencyClass::Interactive.to_proto() as i32,
        ..Default::default()
    }
}

/// Every message until the stream ends (at most 10 s).
async fn collect(
    service: &GatewayService,
    req: GenerateRequest,
) -> Vec<Result<GenerateResponse, Status>> {
    let stream = service.start(req, None, None).expect("placed");
    tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
        .await
        .expect("the stream ended")
}

fn token_ids(msgs: &[Result<GenerateResponse, Status>]) -> Vec<u32> {
    msgs.iter()
        .filter_map(|m| m.as_ref().ok())
        .flat_map(|m| m.token_ids.clone())
        .collect()
}

fn final_message(msgs: &[Result<GenerateResponse, Status>]) -> &GenerateResponse {
    let m = msgs.last().expect("a message").as_ref().expect("ends well");
    assert_ne!(m.finish_reason, FinishReason::Unspecified as i32);
    m
}

const FAST: Script = Script::Tokens {
    gap: Duration::from_millis(1),
};

#[tokio::test]
async fn drive_retries_on_another_worker_before_the_first_token() {
    let a = FakeWorker::start("a", Script::FailBefore(Code::Unavailable)).await;
    let b = FakeWorker::start("b", FAST).await;
    let (svc, _, _snap) = gateway(&[(&a, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    let msgs = collect(&svc, request(5)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3, 4]);
    assert_eq!(final_message(&msgs).migrations, 0);
    assert_eq!((a.calls(), b.calls()), (1, 1));
    assert_eq!(*b.seen.resumed_from.lock().unwrap(), vec![0]);
    assert_eq!(
        b.seen.dropped.load(Ordering::SeqCst),
        0,
        "finished, not dropped"
    );
}

#[tokio::test]
async fn drive_migrates_the_stream_after_n_tokens() {
    let a = FakeWorker::start(
        "a",
        Script::FailAfter {
            tokens: 3,
            code: Code::Unavailable,
        },
    )
    .await;
    let b = FakeWorker::start("b", FAST).await;
    let (svc, _, _snap) = gateway(&[(&a, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    let msgs = collect(&svc, request(6)).await;
    assert_eq!(
        token_ids(&msgs),
        vec![0, 1, 2, 3, 4, 5],
        "no token lost or repeated"
    );
    let last = final_message(&msgs);
    assert_eq!(last.migrations, 1);
    assert_eq!(last.usage.unwrap().completion_tokens, 6);
    assert_eq!(*b.seen.resumed_from.lock().unwrap(), vec![3]);
}

fn requiring_invariance(max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        batch_invariant: true,
        ..request(max_tokens)
    }
}

#[tokio::test]
async fn drive_migrates_a_batch_invariant_stream_only_to_a_batch_invariant_worker() {
    // `b` is the better interactive choice after `a` (full GPU) but is not batch-invariant.
    let a = FakeWorker::start_with(
        "a",
        Script::FailAfter {
            tokens: 3,
            code: Code::Unavailable,
        },
        Some(true),
    )
    .await;
    let b = FakeWorker::start_with("b", FAST, Some(false)).await;
    let c = FakeWorker::start_with("c", FAST, Some(true)).await;
    let (svc, _, _snap) = gateway(
        &[(&a, "full"), (&b, "full"), (&c, "cpu-moe")],
        Duration::from_secs(10),
    );
    let msgs = collect(&svc, requiring_invariance(6)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3, 4, 5]);
    let last = final_message(&msgs);
    assert_eq!(last.migrations, 1);
    assert!(last.batch_invariant);
    assert_eq!((a.calls(), b.calls(), c.calls()), (1, 0, 1));
    assert_eq!(*c.seen.resumed_from.lock().unwrap(), vec![3]);
}

#[tokio::test]
async fn drive_fails_a_batch_invariant_stream_rather_than_move_it_to_another_worker() {
    let failing = || Script::FailAfter {
        tokens: 3,
        code: Code::Unavailable,
    };
    let a = FakeWorker::start_with("a", failing(), Some(true)).await;
    let b = FakeWorker::start_with("b", FAST, Some(false)).await;
    let old = FakeWorker::start_with("old", FAST, None).await;
    let (svc, _, _snap) = gateway(
        &[(&a, "full"), (&b, "cpu-moe"), (&old, "cpu-moe")],
        Duration::from_secs(10),
    );
    let msgs = collect(&svc, requiring_invariance(6)).await;
    assert_eq!(
        token_ids(&msgs),
        vec![0, 1, 2],
        "what a produced, then the error"
    );
    let err = msgs.last().unwrap().as_ref().expect_err("the stream fails");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!((a.calls(), b.calls(), old.calls()), (1, 0, 0));

    // Without the field the stream moves on, and the final message says the output is not
    // (all) from batch-invariant workers, although `a` was one.
    let a = FakeWorker::start_with("a", failing(), Some(true)).await;
    let (svc, _, _snap) = gateway(&[(&a, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    let msgs = collect(&svc, request(6)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3, 4, 5]);
    assert!(!final_message(&msgs).batch_invariant);
}

#[tokio::test]
async fn drive_reports_batch_invariance_only_when_every_producing_worker_had_it() {
    // `a` (not invariant) produces the start, `c` (invariant) the end.
    let a = FakeWorker::start_with(
        "a",
        Script::FailAfter {
            tokens: 2,
            code: Code::Unavailable,
        },
        Some(false),
    )
    .await;
    let c = FakeWorker::start_with("c", FAST, Some(true)).await;
    let (svc, _, _snap) = gateway(&[(&a, "full"), (&c, "cpu-moe")], Duration::from_secs(10));
    let msgs = collect(&svc, request(5)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3, 4]);
    let last = final_message(&msgs);
    assert_eq!(last.migrations, 1);
    assert!(!last.batch_invariant, "c alone would say true");
    // A stream c produces alone says what c says.
    let (svc, _, _snap) = gateway(&[(&c, "cpu-moe")], Duration::from_secs(10));
    assert!(final_message(&collect(&svc, request(3)).await).batch_invariant);
}

/// A batch-invariant worker advertising `fingerprint` that sends 4 tokens and then fails
/// (UNAVAILABLE) instead of sending its final message.
async fn dies_after_four_tokens(id: &str, fingerprint: Option<&str>) -> FakeWorker {
    let mut w = FakeWorker::start_with(
        id,
        Script::FailAfter {
            tokens: 4,
            code: Code::Unavailable,
        },
        Some(true),
    )
    .await;
    w.system_fingerprint = fingerprint.map(str::to_string);
    w
}

#[tokio::test]
async fn drive_writes_the_final_message_with_the_dead_producers_advertised_fingerprint() {
    // `a` produces every token, then fails instead of sending its final message: the gateway
    // writes it, without calling `b`, from what `a` advertised.
    let a = dies_after_four_tokens("a", Some("fp_00000000000000aa")).await;
    let mut b = FakeWorker::start_with("b", FAST, Some(true)).await;
    b.system_fingerprint = Some("fp_00000000000000bb".into());
    let (svc, _, _snap) = gateway(&[(&a, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    let msgs = collect(&svc, request(4)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3]);
    let last = final_message(&msgs);
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert!(last.batch_invariant);
    assert_eq!(last.system_fingerprint, "fp_00000000000000aa");
    assert_eq!((a.calls(), b.calls()), (1, 0));
    // A worker older than the field: the fingerprint stays unknown (empty), never b's.
    let old = dies_after_four_tokens("old", None).await;
    let (svc, _, _snap) = gateway(&[(&old, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    let last = final_message(&collect(&svc, request(4)).await).clone();
    assert_eq!(last.system_fingerprint, "");
    assert_eq!(b.calls(), 0);
}

#[tokio::test]
async fn drive_writes_the_final_message_when_the_dead_producer_was_the_only_worker() {
    // No other worker to pick: the client has every token, so the stream still ends well.
    let a = dies_after_four_tokens("a", Some("fp_00000000000000aa")).await;
    let (svc, _, _snap) = gateway(&[(&a, "full")], Duration::from_secs(10));
    let msgs = collect(&svc, request(4)).await;
    assert!(msgs.iter().all(|m| m.is_ok()), "no error: {msgs:?}");
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3]);
    let last = final_message(&msgs);
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(last.usage.unwrap().completion_tokens, 4);
    assert_eq!(last.migrations, 0, "nothing moved to another worker");
    assert!(last.batch_invariant);
    assert_eq!(last.system_fingerprint, "fp_00000000000000aa");
    assert_eq!(a.calls(), 1, "the dead worker is not called again");
}

#[tokio::test]
async fn a_batch_invariant_request_with_no_batch_invariant_worker_is_refused_naming_the_field() {
    let b = FakeWorker::start_with("b", FAST, Some(false)).await;
    let old = FakeWorker::start_with("old", FAST, None).await;
    let (svc, _, _snap) = gateway(&[(&b, "full"), (&old, "cpu-moe")], Duration::from_secs(10));
    let err = svc
        .start(requiring_invariance(4), None, None)
        .expect_err("refused before any worker is called");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().starts_with("batch_invariant: "), "{err:?}");
    assert!(
        err.message()
            .contains("no worker guarantees batch-invariant output"),
        "{err:?}"
    );
    assert_eq!((b.calls(), old.calls()), (0, 0));
}

#[tokio::test]
async fn drive_hands_a_draining_workers_stream_over() {
    let a = FakeWorker::start("a", Script::Drain { tokens: 2 }).await;
    let b = FakeWorker::start("b", FAST).await;
    let (svc, _, _snap) = gateway(&[(&a, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    let msgs = collect(&svc, request(4)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3]);
    assert_eq!(final_message(&msgs).migrations, 1);
    assert_eq!(*b.seen.resumed_from.lock().unwrap(), vec![2]);
}

#[tokio::test]
async fn drive_fails_when_the_retry_budget_is_spent() {
    let a = FakeWorker::start("a", Script::FailBefore(Code::Unavailable)).await;
    let b = FakeWorker::start("b", FAST).await;
    let (svc, router, _snap) = gateway(&[(&a, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    while router.take_retry() {}
    let msgs = collect(&svc, request(4)).await;
    let err = msgs.last().unwrap().as_ref().expect_err("fails");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!((a.calls(), b.calls()), (1, 0), "no retry without budget");
}

/// Waits (at most 5 s) until the worker saw `n` streams dropped by the gateway.
async fn dropped(w: &FakeWorker, n: usize) {
    for _ in 0..100 {
        if w.seen.dropped.load(Ordering::SeqCst) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not cancel the worker stream");
}

#[tokio::test]
async fn drive_ends_a_stalled_stream_at_the_deadline() {
    let a = FakeWorker::start("a", Script::Stall).await;
    let (svc, _, _snap) = gateway(&[(&a, "full")], Duration::from_millis(300));
    let t = Instant::now();
    let msgs = collect(&svc, request(4)).await;
    let err = msgs.last().unwrap().as_ref().expect_err("fails");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    dropped(&a, 1).await;
}

#[tokio::test]
async fn drive_moves_a_stream_off_a_silent_worker_after_the_idle_timeout() {
    let a = FakeWorker::start("a", Script::Stall).await;
    let b = FakeWorker::start("b", FAST).await;
    let (svc, _, _snap) = gateway_with(
        &[(&a, "full"), (&b, "cpu-moe")],
        Duration::from_secs(10),
        Duration::from_millis(200),
        |r| r,
    );
    let msgs = collect(&svc, request(3)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2]);
    assert_eq!((a.calls(), b.calls()), (1, 1));
    dropped(&a, 1).await;
}

#[tokio::test]
async fn drive_fails_a_stalled_worker_fast_and_releases_the_key_quota() {
    let a = FakeWorker::start("a", Script::Stall).await;
    let (svc, _, _snap) = gateway_with(
        &[(&a, "full")],
        Duration::from_secs(10),
        Duration::from_millis(200),
        |r| r,
    );
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), "k-0123456789abcdef max_concurrent=1\n").unwrap();
    let svc = svc.with_api_keys(Some(Arc::new(ApiKeys::load(keys.path()).unwrap())));
    let key = Some("k-0123456789abcdef");
    let t = Instant::now();
    let stream = svc.start(request(4), None, key).expect("admitted");
    let msgs = tokio::time::timeout(Duration::from_secs(5), stream.collect::<Vec<_>>())
        .await
        .expect("the stream ended");
    let err = msgs.last().unwrap().as_ref().expect_err("fails");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    dropped(&a, 1).await;
    // The key's one stream slot is free again.
    svc.start(request(4), None, key)
        .expect("the key's quota was released");
}

#[tokio::test]
async fn drive_lets_go_of_a_client_that_stops_reading() {
    let a = FakeWorker::start("a", FAST).await;
    let (svc, _, _snap) = gateway_with(
        &[(&a, "full")],
        Duration::from_secs(10),
        Duration::from_millis(200),
        |r| r,
    );
    // More tokens than the client's channel holds, and the client reads none.
    let stream = svc.start(request(500), None, None).expect("placed");
    dropped(&a, 1).await;
    let msgs = tokio::time::timeout(Duration::from_secs(5), stream.collect::<Vec<_>>())
        .await
        .expect("the stream ended");
    let err = msgs
        .last()
        .unwrap()
        .as_ref()
        .expect_err("ends with a status");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(token_ids(&msgs).len() < 500);
}

#[tokio::test]
async fn drive_drain_migrations_do_not_spend_the_retry_budget() {
    let a = FakeWorker::start("a", Script::Drain { tokens: 2 }).await;
    let b = FakeWorker::start("b", FAST).await;
    let (svc, router, _snap) = gateway(&[(&a, "full"), (&b, "cpu-moe")], Duration::from_secs(10));
    while router.take_retry() {}
    let msgs = collect(&svc, request(4)).await;
    assert_eq!(token_ids(&msgs), vec![0, 1, 2, 3]);
    assert_eq!(final_message(&msgs).migrations, 1);
}

#[tokio::test]
async fn drive_ejects_a_worker_that_keeps_failing() {
    let a = FakeWorker::start("a", Script::FailBefore(Code::Unavailable)).await;
    let b = FakeWorker::start("b", FAST).await;
    let (svc, router, _snap) = gateway_with(
        &[(&a, "full"), (&b, "cpu-moe")],
        Duration::from_secs(10),
        Duration::from_secs(30),
        |r| {
            r.with_outliers(OutlierConfig {
                failures: 2,
                ejection: Duration::from_secs(30),
                ..OutlierConfig::default()
            })
        },
    );
    for _ in 0..5 {
        let msgs = collect(&svc, request(2)).await;
        assert_eq!(token_ids(&msgs), vec![0, 1]);
    }
    assert_eq!(a.calls(), 2, "ejected after two failures in a row");
    assert_eq!(b.calls(), 5);
    assert_eq!(router.ejected(), vec!["a".to_string()]);
}

#[tokio::test]
async fn drive_cancels_the_worker_stream_when_the_client_leaves() {
    let a = FakeWorker::start("a", Script::OnCue).await;
    let (svc, _, _snap) = gateway(&[(&a, "full")], Duration::from_secs(10));
    let mut stream = svc.start(request(8), None, None).expect("placed");
    a.cue.add_permits(1);
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a token")
        .expect("open")
        .expect("ok");
    assert_eq!(first.token_ids, vec![0]);
    drop(stream);
    for _ in 0..100 {
        if a.seen.dropped.load(Ordering::SeqCst) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the worker stream was not cancelled after the client left");
}

/// `worker`'s advert with every one of its 8 slots busy and `queued` requests waiting: at the
/// fake advert's 100 tokens/s the admission queue predicts about (queued + 1) / 8 × 0.5 s for a
/// 100-token answer (a sequence frees after about half a typical answer).
fn busy(tx: &watch::Sender<Arc<ClusterSnapshot>>, worker: &FakeWorker, queued: u32) {
    let mut advert = worker.advert("full");
    advert.load = moe_common::registry::Load { active: 8, queued };
    let snapshot = ClusterSnapshot {
        revision: 2,
        workers: [(worker.id.clone(), Arc::new(advert))].into(),
        rejected: Default::default(),
    };
    tx.send(Arc::new(snapshot)).unwrap();
}

fn retry_after_ms(s: &Status) -> u64 {
    s.metadata()
        .get("retry-after-ms")
        .expect("retry-after-ms")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Issue 16: a request that would wait in a worker's queue past its deadline is refused at once
/// (RESOURCE_EXHAUSTED, the predicted wait as its hint), never sent to wait there; one whose
/// deadline leaves room is placed and served.
#[tokio::test]
async fn a_request_whose_deadline_would_pass_while_queued_is_refused_at_once() {
    let a = FakeWorker::start("a", FAST).await;
    let (svc, _, snap) = gateway(&[(&a, "full")], Duration::from_secs(10));
    busy(&snap, &a, 40); // about 2.6 s to wait
    let t = Instant::now();
    let refused = svc
        .start(request(100), Some(Duration::from_secs(1)), None)
        .expect_err("refused at once");
    assert!(t.elapsed() < Duration::from_millis(200));
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("deadline"),
        "{}",
        refused.message()
    );
    let hint = retry_after_ms(&refused);
    assert!((2000..4000).contains(&hint), "hint {hint} ms");
    assert_eq!(a.calls(), 0, "never sent to wait at the worker");
    // A deadline beyond the predicted wait: placed (queued there) and served.
    let stream = svc
        .start(request(100), Some(Duration::from_secs(8)), None)
        .expect("placed");
    let msgs = tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
        .await
        .expect("the stream ended");
    assert_eq!(token_ids(&msgs), (0..100).collect::<Vec<u32>>());
    assert_eq!(a.calls(), 1);
}

/// Issue 16: a refusal's retry hint is the admission queue's expected wait, the same value over
/// gRPC (`retry-after-ms`, `grpc-retry-pushback-ms`) and HTTP (`Retry-After`, whole seconds
/// rounded up), not a constant.
#[tokio::test]
async fn refusals_carry_the_expected_queue_wait_as_their_retry_hint() {
    let a = FakeWorker::start("a", Script::FailBefore(Code::ResourceExhausted)).await;
    let (svc, _, snap) = gateway(&[(&a, "full")], Duration::from_secs(30));
    let mut hints = Vec::new();
    for queued in [0, 40] {
        busy(&snap, &a, queued);
        let msgs = collect(&svc, request(100)).await;
        let status = msgs.last().unwrap().as_ref().unwrap_err().clone();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let ms = retry_after_ms(&status);
        assert_eq!(
            status.metadata().get("grpc-retry-pushback-ms").unwrap(),
            ms.to_string().as_str()
        );
        let http =
            axum::response::IntoResponse::into_response(moe_gateway::http::ApiError::from(status));
        assert_eq!(http.status(), 429);
        assert_eq!(
            http.headers()["retry-after"],
            ms.div_ceil(1000).to_string().as_str()
        );
        hints.push(ms);
    }
    // A short queue: the least hint; a long one: its predicted wait (about 2.6 s).
    assert_eq!(hints[0], 1000);
    assert!((2000..4000).contains(&hints[1]), "{hints:?}");
}
