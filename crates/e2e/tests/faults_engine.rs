//! Issue 16, review H3 end to end: a worker whose engine thread panics (test-only hook
//! `MOE_TEST_ENGINE_PANIC_AFTER=N`: panic after N generated tokens) must not stay a healthy,
//! `ready` zombie: its streams end with an error, it leaves etcd at once and exits non-zero,
//! and the gateway routes to the healthy worker.

use std::time::Duration;

use moe_e2e::*;

const PROMPT: &str = "The capital of France is";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_panic_makes_the_worker_leave_etcd_and_exit_non_zero() {
    let etcd = Etcd::start().await;
    let prefix = "/f-engine";
    let mut zombie = WorkerProcess::start_with_env(
        WorkerSpec::new("zombie", "full"),
        &etcd,
        prefix,
        &[("MOE_TEST_ENGINE_PANIC_AFTER", "10")],
    )
    .await;
    let url = format!("http://{}", zombie.addr);
    let stream = tokio::time::timeout(Duration::from_secs(30), generate(&url, greedy(PROMPT, 40)))
        .await
        .expect("the stream on a dying engine ends, it does not hang");
    assert!(
        stream.is_err(),
        "a panicked engine cannot finish 40 tokens: {stream:?}"
    );
    let code = zombie.wait_exit(Duration::from_secs(15)).await;
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
    assert!(
        etcd.advert(prefix, "zombie").await.is_none(),
        "the advert is revoked before exit, not left to its lease TTL"
    );

    let healthy = Worker::start(WorkerSpec::new("healthy", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    let out = generate(&gateway.url(), greedy(PROMPT, 8))
        .await
        .expect("served by the healthy worker");
    assert_eq!(out.last.worker_id, "healthy");
    gateway.stop().await;
    healthy.stop().await;
}
