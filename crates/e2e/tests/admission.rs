//! Issue 16 with a real gateway, etcd and llama.cpp worker: no false refusals. Requests the
//! worker can serve by waiting wait (in its admission queue) instead of being refused; BATCH
//! work cannot keep INTERACTIVE work out (review M6); overload is refused with a retry hint,
//! never a hang.
//!
//! One worker with `--parallel 4` (4 slots of 512 KV cells each) behind one gateway per test.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moe_common::pb::{FinishReason, GenerateRequest, LatencyClass};
use moe_e2e::*;
use tonic::{Code, Status};

/// The tests each drive a worker's four slots; two at once on a small machine would measure the
/// machine, not the admission rules.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// About 450 bytes of plain English: the gateway's bytes/3 estimate is about 150 tokens, the
/// tokenizer's count under 100. On a worker of 512 cells (`--ctx-size 512 --parallel 4`: four
/// slots of 128), four of these with 16 new tokens each fit their slots, but four bytes/3
/// estimates (about 670 cells) do not fit the worker's 512.
const LONG_PROMPT: &str = "The old lighthouse stood at the end of a narrow stone pier, and for \
more than a hundred years its keepers had climbed the spiral stairs every evening to light the \
lamp. The town below grew from a handful of fishing cottages into a busy harbour with markets, \
schools and a railway station, but the lighthouse changed very little. Its walls were painted \
white every spring and its brass was polished every week. Tell me, in one short sentence, what";

const SHORT_PROMPT: &str = "The capital of France is";

/// A prompt greedy decoding continues for hundreds of tokens (BATCH streams that hold their
/// slots while an INTERACTIVE request arrives).
const COUNT_PROMPT: &str = "Counting to three hundred: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,";

fn request(prompt: &str, max_tokens: u32, class: LatencyClass) -> GenerateRequest {
    let mut r = greedy(prompt, max_tokens);
    r.latency_class = class as i32;
    r
}

/// A gateway routing to one `--parallel 4` worker, the worker serving through it.
struct Cluster {
    _etcd: Etcd,
    worker: Worker,
    gateway: Gateway,
}

impl Cluster {
    async fn start(
        prefix: &str,
        ctx_size: u32,
        worker_flags: &[(&str, &str)],
        gateway_flags: &[&str],
    ) -> Self {
        let etcd = Etcd::start().await;
        let mut spec = WorkerSpec {
            ctx_size,
            ..WorkerSpec::new("w", "full")
        };
        for (f, v) in worker_flags {
            spec = spec.with(f, v);
        }
        let worker = Worker::start(spec, Some((&etcd, prefix))).await;
        let gateway = Gateway::start(&etcd, prefix, gateway_flags).await;
        let url = gateway.url();
        // The gateway has seen the worker (and the model is warm) once a request is served.
        eventually(Duration::from_secs(30), "the gateway to route", || {
            let url = url.clone();
            async move {
                generate(&url, request(SHORT_PROMPT, 1, LatencyClass::Interactive))
                    .await
                    .ok()
            }
        })
        .await;
        Cluster {
            _etcd: etcd,
            worker,
            gateway,
        }
    }

    async fn stop(self) {
        self.gateway.stop().await;
        self.worker.stop().await;
    }
}

/// Runs the requests at once (each after its delay); each result with the time it took.
async fn all_at_once(
    url: &str,
    reqs: Vec<(Duration, GenerateRequest)>,
) -> Vec<(Result<Collected, Status>, Duration)> {
    let c = client(url).await;
    let handles: Vec<_> = reqs
        .into_iter()
        .map(|(delay, r)| {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let t = Instant::now();
                let out = collect(c, tonic::Request::new(r)).await;
                (out, t.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("request task"));
    }
    out
}

fn has_retry_hint(s: &Status) -> bool {
    let ms = |k: &str| {
        s.metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    matches!(ms("retry-after-ms"), Some(m) if m > 0)
        && matches!(ms("grpc-retry-pushback-ms"), Some(m) if m > 0)
        && s.message().contains("retry-after")
}

/// New tokens per request in the N / 2N test.
const NEW_TOKENS: u32 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_and_2n_concurrent_requests_on_n_slots_are_all_served() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("/t-adm-n", 512, &[], &[]).await;
    let url = cluster.gateway.url();
    for n in [4usize, 8] {
        let reqs = (0..n)
            .map(|i| {
                let r = request(
                    &format!("({i}) {LONG_PROMPT}"),
                    NEW_TOKENS,
                    LatencyClass::Interactive,
                );
                (Duration::ZERO, r)
            })
            .collect();
        let started = Instant::now();
        let results = all_at_once(&url, reqs).await;
        for (i, (r, took)) in results.iter().enumerate() {
            let done = r
                .as_ref()
                .unwrap_or_else(|e| panic!("{n} concurrent: request {i} refused: {e:?}"));
            // Served to the end: every token asked for, or the model's own stop before them.
            assert!(
                matches!(done.finish(), FinishReason::Length | FinishReason::Stop),
                "request {i}: {:?}",
                done.finish()
            );
            let usage = done.last.usage.unwrap_or_default();
            assert!(
                usage.prompt_tokens + NEW_TOKENS <= 128,
                "the request must fit its 128-cell slot ({} prompt tokens)",
                usage.prompt_tokens
            );
            if n == 4 && i == 0 {
                // The premise: the bytes/3 estimates of four of these are more than the cache.
                let estimate = LONG_PROMPT.len() as u32 / 3 + NEW_TOKENS;
                assert!(4 * estimate > 512, "estimate {estimate}");
                eprintln!(
                    "prompt: {} tokens (bytes/3 estimate {}), {took:?}",
                    usage.prompt_tokens,
                    LONG_PROMPT.len() / 3
                );
            }
        }
        eprintln!(
            "{n} concurrent on 4 slots: all served in {:?}",
            started.elapsed()
        );
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interactive_is_served_while_batch_fills_every_other_slot() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start("/t-adm-mix", 2048, &[], &[]).await;
    let url = cluster.gateway.url();
    // Four long BATCH streams: three run, the fourth waits although a slot is free (that slot
    // is INTERACTIVE's).
    let started = Arc::new(AtomicUsize::new(0));
    let c = client(&url).await;
    let batch: Vec<_> = (0..4)
        .map(|i| {
            let mut c = c.clone();
            let started = started.clone();
            tokio::spawn(async move {
                let req = request(&format!("{i}. {COUNT_PROMPT}"), 400, LatencyClass::Batch);
                let mut s = c.generate(req).await?.into_inner();
                let mut first = true;
                while let Some(m) = s.message().await? {
                    if first {
                        started.fetch_add(1, Ordering::SeqCst);
                        first = false;
                    }
                    if m.finish_reason != FinishReason::Unspecified as i32 {
                        return Ok::<_, Status>((Instant::now(), m.finish_reason));
                    }
                }
                Err(Status::internal(
                    "batch stream ended without a final message",
                ))
            })
        })
        .collect();
    eventually(
        Duration::from_secs(60),
        "three BATCH streams to run",
        || {
            let n = started.load(Ordering::SeqCst);
            async move { (n >= 3).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        started.load(Ordering::SeqCst),
        3,
        "BATCH took only three of the four slots"
    );
    let sent = Instant::now();
    let mut s = client(&url)
        .await
        .generate(request(SHORT_PROMPT, 8, LatencyClass::Interactive))
        .await
        .expect("INTERACTIVE accepted while BATCH fills the worker")
        .into_inner();
    let mut ttft = None;
    let mut last = None;
    while let Some(m) = s.message().await.expect("INTERACTIVE served") {
        if ttft.is_none() && !m.token_ids.is_empty() {
            ttft = Some(sent.elapsed());
        }
        if m.finish_reason != FinishReason::Unspecified as i32 {
            last = Some(m);
            break;
        }
    }
    let done = Instant::now();
    let last = last.expect("final message");
    let ttft = ttft.expect("a token");
    let queue = last.timings.unwrap_or_default().queue_seconds;
    eprintln!(
        "INTERACTIVE under 3 running + 1 queued BATCH: TTFT {ttft:?}, queued {queue:.3}s at the worker, done in {:?}",
        done - sent
    );
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert!(
        queue < 1.0,
        "admitted at once into the reserved slot, not after a BATCH stream ({queue:.2}s)"
    );
    // The premise: the BATCH streams held their slots (and the fourth its place in the queue)
    // all the while; none has ended, with an error or otherwise.
    let running = batch.iter().filter(|h| !h.is_finished()).count();
    assert_eq!(
        running, 4,
        "every BATCH stream outlasted the INTERACTIVE request"
    );
    // Dropping them cancels them at the worker.
    for h in &batch {
        h.abort();
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_admits_interactive_and_refuses_batch_with_a_retry_hint() {
    let _serial = SERIAL.lock().await;
    // 48 gateway streams (6 kept for INTERACTIVE), a worker queue of 32 (4 kept for INTERACTIVE).
    let cluster = Cluster::start(
        "/t-adm-over",
        512,
        &[("--max-queue", "32"), ("--queue-timeout", "20s")],
        // Enough decoding places for the whole burst: the class-blind decoding limit (review
        // M7) is not what this test is about.
        &["--max-concurrency", "48", "--max-decoding-requests", "128"],
    )
    .await;
    let url = cluster.gateway.url();
    // 20 times the worker's four slots of BATCH requests at once, then, while they wait, four
    // INTERACTIVE ones.
    let mut reqs: Vec<_> = (0..80)
        .map(|i| {
            let r = request(&format!("{i}. {SHORT_PROMPT}"), 8, LatencyClass::Batch);
            (Duration::ZERO, r)
        })
        .collect();
    reqs.extend((0..4).map(|i| {
        let r = request(
            &format!("Interactive {i}: {SHORT_PROMPT}"),
            4,
            LatencyClass::Interactive,
        );
        (Duration::from_millis(300), r)
    }));
    let started = Instant::now();
    let results = tokio::time::timeout(Duration::from_secs(60), all_at_once(&url, reqs))
        .await
        .expect("no request hangs: all end within 60 s");
    let elapsed = started.elapsed();
    let (mut served, mut refused) = (0, 0);
    // When each request ended, from the start of the burst.
    let ended = |i: usize| {
        let delay = if i >= 80 { 300 } else { 0 };
        Duration::from_millis(delay) + results[i].1
    };
    for (i, (r, _)) in results.iter().enumerate() {
        let interactive = i >= 80;
        match r {
            Ok(done) => {
                assert!(
                    matches!(done.finish(), FinishReason::Length | FinishReason::Stop),
                    "request {i}: {:?}",
                    done.finish()
                );
                served += 1;
            }
            Err(e) if interactive => {
                panic!("INTERACTIVE request {i} refused under overload: {e:?}")
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "request {i}: {e:?}");
                assert!(
                    has_retry_hint(e),
                    "request {i} refused without a retry hint: {e:?}"
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "overload: 80 BATCH + 4 INTERACTIVE: {served} served (4 INTERACTIVE), {refused} BATCH refused with a retry hint, {elapsed:?}"
    );
    assert!(
        refused > 0,
        "80 BATCH requests overloaded a 48-stream gateway"
    );
    assert!(
        served >= 4 + 3,
        "served the INTERACTIVE ones and at least the running BATCH ones"
    );
    // The INTERACTIVE ones were served during the overload, not after it.
    let last_interactive = (80..84).map(ended).max().unwrap();
    let last_batch = (0..80)
        .filter(|&i| results[i].0.is_ok())
        .map(ended)
        .max()
        .unwrap();
    eprintln!("last INTERACTIVE done at {last_interactive:?}, last BATCH at {last_batch:?}");
    assert!(
        last_interactive < last_batch,
        "INTERACTIVE requests were admitted ahead of the queued BATCH work"
    );
    // Afterwards the cluster serves normally.
    let ok = generate(&url, request(COUNT_PROMPT, 4, LatencyClass::Batch))
        .await
        .expect("served after the overload");
    assert_eq!(ok.finish(), FinishReason::Length);
    cluster.stop().await;
}
