//! Issue 4 with real workers: placement by latency class, spill-over, retries and mid-stream
//! migration through a real gateway.

use std::time::Duration;

use moe_common::pb::{FinishReason, GenerateRequest, LatencyClass};
use moe_e2e::*;

const PROMPT: &str = "The capital of France is";
/// Long enough that the stream is still running once the serving worker's advert shows it
/// (advert writes of load changes are rate-limited), so the kill lands mid-stream.
const MIGRATED_TOKENS: u32 = 160;

fn with_class(mut req: GenerateRequest, class: LatencyClass) -> GenerateRequest {
    req.latency_class = class as i32;
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interactive_lands_on_full_batch_on_cpu_moe_and_spills_when_saturated() {
    let etcd = Etcd::start().await;
    let prefix = "/t-route";
    // One sequence of 2048 cells: with a KV stream per sequence (the batch-invariant default), the
    // 1900-token hog below must fit one slot.
    let mut full_spec = WorkerSpec::new("full", "full");
    full_spec.parallel = 1;
    let full = Worker::start(full_spec, Some((&etcd, prefix))).await;
    let offload = Worker::start(WorkerSpec::new("offload", "cpu-moe"), Some((&etcd, prefix))).await;
    // Batch spill off: batch work must never take the fast pool.
    let gateway = Gateway::start(&etcd, prefix, &["--batch-spill", "off"]).await;
    let url = gateway.url();

    let i = generate(
        &url,
        with_class(greedy(PROMPT, 4), LatencyClass::Interactive),
    )
    .await
    .unwrap();
    assert_eq!(
        (i.last.worker_id.as_str(), i.last.offload_profile.as_str()),
        ("full", "full")
    );
    let b = generate(&url, with_class(greedy(PROMPT, 4), LatencyClass::Batch))
        .await
        .unwrap();
    assert_eq!(
        (b.last.worker_id.as_str(), b.last.offload_profile.as_str()),
        ("offload", "cpu-moe")
    );

    // Saturate the full worker's only slot (2048 cells): a 1900-token reservation leaves no room for
    // another 400-token request, so interactive work spills to the cpu-moe worker.
    // The first two requests' reservations are gone once the adverts say so (they are written
    // at most every 250 ms for small changes): only then is the whole slot free again.
    eventually(
        Duration::from_secs(5),
        "the full worker to advertise its whole sequence free",
        || async {
            let free = etcd.advert(prefix, "full").await?.capacity.free_kv_tokens;
            (free >= 2000).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut c = client(&url).await;
    let mut hog = c
        .generate(with_class(greedy(PROMPT, 1900), LatencyClass::Interactive))
        .await
        .unwrap()
        .into_inner();
    hog.message().await.unwrap().expect("hog streams");
    let spilled = generate(
        &url,
        with_class(greedy(PROMPT, 400), LatencyClass::Interactive),
    )
    .await
    .unwrap();
    assert_eq!(
        spilled.last.worker_id, "offload",
        "spilled to the other pool"
    );
    drop(hog);
    gateway.stop().await;
    full.stop().await;
    offload.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_migrates_to_another_worker_without_changing_the_text() {
    let etcd = Etcd::start().await;
    let prefix = "/t-migrate";
    // One slot each: a stream starting or ending fills or frees the worker, which its advert
    // shows within 250 ms (with more slots it is drift, written only within the lease TTL), so
    // `serving_worker` finds the stream's worker while it runs.
    let one_slot = |id: &str| {
        let mut spec = WorkerSpec::new(id, "full");
        spec.parallel = 1;
        spec
    };
    let a = WorkerProcess::start(one_slot("a"), &etcd, prefix).await;
    let b = WorkerProcess::start(one_slot("b"), &etcd, prefix).await;
    let reference = generate(
        &format!("http://{}", a.addr),
        greedy(PROMPT, MIGRATED_TOKENS),
    )
    .await
    .expect("uninterrupted");
    let gateway = Gateway::start(&etcd, prefix, &[]).await;

    let mut c = client(&gateway.url()).await;
    let mut stream = c
        .generate(greedy(PROMPT, MIGRATED_TOKENS))
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    let mut tokens = Vec::new();
    while tokens.len() < 4 {
        let m = stream.message().await.unwrap().expect("early tokens");
        text.push_str(&m.text);
        tokens.extend(m.token_ids);
    }
    // Find the worker serving the stream and kill it.
    let serving = serving_worker(&etcd, prefix, &["a", "b"]).await;
    let (victim, survivor) = if serving == "a" { (a, b) } else { (b, a) };
    victim.signal("KILL");
    let mut last = None;
    while let Some(m) = stream.message().await.expect("one unbroken stream") {
        text.push_str(&m.text);
        tokens.extend(m.token_ids.iter().copied());
        if m.finish_reason != FinishReason::Unspecified as i32 {
            last = Some(m);
            break;
        }
    }
    let last = last.expect("final message");
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(last.migrations, 1, "the stream moved once");
    assert_eq!(last.worker_id, survivor.id);
    assert_eq!(last.usage.unwrap().completion_tokens, MIGRATED_TOKENS);
    assert_eq!(
        tokens, reference.token_ids,
        "greedy tokens equal the uninterrupted run"
    );
    assert_eq!(text, reference.text);
    drop(victim);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_before_its_first_token_costs_the_client_nothing() {
    let etcd = Etcd::start().await;
    let prefix = "/t-retry";
    let fast = WorkerProcess::start(WorkerSpec::new("fast", "full"), &etcd, prefix).await;
    let _slow = WorkerProcess::start(WorkerSpec::new("slow", "cpu-moe"), &etcd, prefix).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    // The preferred (full) worker dies; its advert lives on until the lease expires, so the
    // gateway still places the interactive request there first.
    fast.signal("KILL");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        etcd.advert(prefix, "fast").await.is_some(),
        "advert not yet expired"
    );
    let out = generate(&gateway.url(), greedy(PROMPT, 8))
        .await
        .expect("retried elsewhere");
    assert_eq!(out.last.worker_id, "slow");
    assert_eq!(out.last.migrations, 0);
    assert!(out.text.contains("Paris"));
    drop(fast);
    gateway.stop().await;
}
