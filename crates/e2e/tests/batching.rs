//! Issue 3 on the real model: continuous batching gives every stream the text it gets alone,
//! cancellation frees KV, overload is refused instead of hanging.

use std::time::{Duration, Instant};

use moe_common::pb::FinishReason;
use moe_e2e::*;
use tonic::Code;

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "The largest planet in the solar system is",
    "Water boils at a temperature of",
    "The first president of the United States was",
    "The chemical symbol for gold is",
    "A week has seven days. The days are",
    "The tallest mountain on Earth is",
    "Photosynthesis is the process by which",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_streams_get_the_same_text_as_alone() {
    // Solo runs on one worker, the concurrent run on a fresh one, so neither reuses the other's
    // prefix cache: both compute every prompt from scratch.
    let spec = WorkerSpec {
        parallel: 8,
        ..WorkerSpec::new("batch8", "full")
    };
    let solo = Worker::start(spec.clone(), None).await;
    let mut alone = Vec::new();
    for p in PROMPTS {
        alone.push(generate(&solo.url(), greedy(p, 64)).await.expect("solo"));
    }
    solo.stop().await;
    let worker = Worker::start(spec, None).await;
    let url = worker.url();
    let started = Instant::now();
    let together = futures_join(PROMPTS.iter().map(|p| {
        let url = url.clone();
        async move { generate(&url, greedy(p, 64)).await.expect("concurrent") }
    }))
    .await;
    let concurrent_time = started.elapsed();
    for ((p, a), t) in PROMPTS.iter().zip(&alone).zip(&together) {
        assert_eq!(
            a.token_ids, t.token_ids,
            "prompt {p:?}: {:?} vs {:?}",
            a.text, t.text
        );
        assert_eq!(t.finish(), a.finish());
    }
    // They really ran together: admission happened while others were decoding.
    let queue_max = together
        .iter()
        .map(|c| c.last.timings.unwrap().queue_seconds)
        .fold(0.0, f64::max);
    assert!(
        queue_max < 1.0,
        "all eight were admitted at once (max queue {queue_max:.2}s, total {concurrent_time:?})"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_resource_exhausted_never_a_hang() {
    let worker = Worker::start(
        WorkerSpec {
            parallel: 1,
            ..WorkerSpec::new("tiny-queue", "full")
        }
        .with("--max-queue", "1")
        .with("--queue-timeout", "1s"),
        None,
    )
    .await;
    let url = worker.url();
    // One long stream holds the only slot.
    let mut c = client(&url).await;
    let mut running = c
        .generate(greedy(PROMPTS[0], 400))
        .await
        .unwrap()
        .into_inner();
    running.message().await.unwrap().expect("first token");
    // The second waits in the queue, the third finds the queue full.
    let queued = tokio::spawn({
        let url = url.clone();
        async move { generate(&url, greedy(PROMPTS[1], 4)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let full = generate(&url, greedy(PROMPTS[2], 4))
        .await
        .expect_err("queue full");
    assert_eq!(full.code(), Code::ResourceExhausted, "{}", full.message());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    let timed_out = queued.await.unwrap().expect_err("queue timeout");
    assert_eq!(
        timed_out.code(),
        Code::ResourceExhausted,
        "{}",
        timed_out.message()
    );
    assert!(
        timed_out.message().contains("not admitted"),
        "{}",
        timed_out.message()
    );
    drop(running);
    // The worker is still healthy afterwards.
    let ok = generate(&url, greedy(PROMPTS[0], 4))
        .await
        .expect("served after overload");
    assert_eq!(ok.finish(), FinishReason::Length);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_stream_frees_its_kv_cells_in_the_advert() {
    let etcd = Etcd::start().await;
    let prefix = "/t-kv";
    // 2048 cells, 4 sequences: each has its own KV stream of 512 cells.
    let worker = Worker::start(WorkerSpec::new("kv", "full"), Some((&etcd, prefix))).await;
    let mut c = client(&worker.url()).await;
    let mut stream = c
        .generate(greedy(PROMPTS[0], 500))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("token");
    // One stream of four slots is drift for the advert: written within the lease TTL (3 s).
    let busy = eventually(
        Duration::from_secs(10),
        "KV reserved in the advert",
        || async {
            etcd.advert(prefix, "kv")
                .await
                .filter(|a| a.capacity.free_kv_tokens < 2048)
        },
    )
    .await;
    // The stream holds its whole slot.
    assert_eq!(busy.capacity.free_kv_tokens, 2048 - 512);
    drop(stream);
    eventually(Duration::from_secs(10), "KV back in the advert", || async {
        etcd.advert(prefix, "kv")
            .await
            .filter(|a| a.capacity.free_kv_tokens == 2048 && a.load.active == 0)
    })
    .await;
    worker.stop().await;
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_prefix_reuses_kv_cells_and_keeps_the_output() {
    let worker = Worker::start(WorkerSpec::new("prefix", "full"), None).await;
    let url = worker.url();
    let system = "You are a helpful assistant who answers questions about geography briefly. ";
    let first = generate(
        &url,
        greedy(&format!("{system}The capital of France is"), 12),
    )
    .await
    .unwrap();
    assert_eq!(first.last.usage.unwrap().cached_prompt_tokens, 0);
    let again = generate(
        &url,
        greedy(&format!("{system}The capital of France is"), 12),
    )
    .await
    .unwrap();
    let usage = again.last.usage.unwrap();
    assert_eq!(
        usage.cached_prompt_tokens,
        usage.prompt_tokens - 1,
        "all but the last prompt token come from the cache"
    );
    assert_eq!(
        again.token_ids, first.token_ids,
        "reuse does not change greedy output"
    );
    let other = generate(&url, greedy(&format!("{system}The capital of Italy is"), 8))
        .await
        .unwrap();
    let u = other.last.usage.unwrap();
    assert!(
        u.cached_prompt_tokens > 10 && u.cached_prompt_tokens < u.prompt_tokens - 1,
        "the shared system prefix is reused: {u:?}"
    );
    assert!(other.text.contains("Rome"), "{:?}", other.text);
    worker.stop().await;
}
