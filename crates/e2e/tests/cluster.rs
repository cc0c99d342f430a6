//! Issue 2, end to end: real etcd, real llama.cpp workers on the SmolLM2 MoE, a real gateway.

use std::time::{Duration, Instant};

use moe_common::pb::{ChatMessage, FinishReason, GenerateRequest};
use moe_common::registry::{Watcher, WorkerState};
use moe_e2e::*;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const PROMPT: &str = "The capital of France is";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn greedy_paris_streams_through_the_gateway_with_the_same_tokens_for_every_profile() {
    let etcd = Etcd::start().await;
    let prefix = "/t-profiles";
    let full = Worker::start(WorkerSpec::new("full", "full"), Some((&etcd, prefix))).await;
    let cpu = Worker::start(WorkerSpec::new("cpu", "cpu-moe"), None).await;
    let partial = Worker::start(WorkerSpec::new("partial", "n-cpu-moe:2"), None).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;

    let mut req = greedy(PROMPT, 12);
    req.request_id = "req-1".into();
    let out = generate(&gateway.url(), req).await.expect("completion");
    assert!(out.text.contains("Paris"), "text was {:?}", out.text);
    assert!(
        out.messages > 2,
        "text arrives as a stream, not one message"
    );
    assert_eq!(out.finish(), FinishReason::Length);
    assert_eq!(out.token_ids.len(), 12);
    let usage = out.last.usage.expect("usage");
    assert_eq!(usage.completion_tokens, 12);
    assert_eq!(
        usage.prompt_tokens, 5,
        "BOS-less SmolLM2 tokenization of the prompt"
    );
    assert_eq!(out.last.worker_id, "full");
    assert_eq!(out.last.offload_profile, "full");
    assert_eq!(out.last.request_id, "req-1");
    let timings = out.last.timings.expect("timings");
    assert!(timings.time_to_first_token_seconds > 0.0);

    for w in [&full, &cpu, &partial] {
        let direct = generate(&w.url(), greedy(PROMPT, 12))
            .await
            .expect("direct");
        assert_eq!(direct.token_ids, out.token_ids, "worker {} differs", w.id);
        assert_eq!(direct.text, out.text);
    }
    gateway.stop().await;
    for w in [full, cpu, partial] {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_messages_are_rendered_with_the_model_template() {
    let worker = Worker::start(WorkerSpec::new("chat", "full"), None).await;
    let req = GenerateRequest {
        // SmolLM2's template adds a default system prompt when there is none, which derails
        // this tiny model: give it one.
        messages: vec![
            ChatMessage {
                role: "system".into(),
                content: "Answer in one word.".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "user".into(),
                content: "What is the capital of France?".into(),
                ..Default::default()
            },
        ],
        max_tokens: 24,
        ..greedy("", 24)
    };
    let out = generate(&worker.url(), req).await.expect("chat completion");
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    assert_eq!(
        out.finish(),
        FinishReason::Stop,
        "the chat answer ends with end-of-turn"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_advert_carries_the_documented_fields_under_a_lease() {
    let etcd = Etcd::start().await;
    let prefix = "/t-advert";
    let worker = Worker::start(WorkerSpec::new("w1", "n-cpu-moe:3"), Some((&etcd, prefix))).await;
    let json = etcd
        .advert_json(prefix, "w1")
        .await
        .expect("advert in etcd");
    for field in [
        "schema",
        "id",
        "endpoint",
        "state",
        "model",
        "offload",
        "devices",
        "memory",
        "capacity",
        "load",
        "speed",
        "version",
        "updated_unix_ms",
    ] {
        assert!(json.get(field).is_some(), "advert lacks {field}: {json}");
    }
    assert_eq!(json["id"], "w1");
    assert_eq!(json["endpoint"], worker.url());
    assert_eq!(json["state"], "ready");
    assert_eq!(json["model"]["name"], "smollm2-moe-4x2");
    assert_eq!(json["model"]["architecture"], "llama");
    assert_eq!(json["model"]["n_layer"], 30);
    assert_eq!(json["model"]["expert_count"], 4);
    assert_eq!(json["model"]["expert_used_count"], 2);
    assert_eq!(json["offload"]["mode"], "n-cpu-moe");
    assert_eq!(json["offload"]["n_cpu_moe"], 3);
    assert_eq!(json["offload"]["profile"], "n-cpu-moe:3");
    let devices = json["devices"].as_array().expect("devices");
    assert!(
        devices.iter().all(|d| d["kind"] == "cpu"),
        "a CPU-only build advertises only CPU: {devices:?}"
    );
    assert!(devices[0]["total_bytes"].as_u64().unwrap() > 0);
    assert!(json["memory"]["weight_bytes"].as_u64().unwrap() > 200_000_000);
    assert!(json["memory"]["kv_bytes"].as_u64().unwrap() > 0);
    assert!(json["memory"]["host_expert_bytes"].as_u64().unwrap() > 0);
    // Host memory is shared with the whole machine: planned, not measured; nothing to pin for.
    assert_eq!(devices[0]["measured"], false);
    assert_eq!(devices[0]["compute_bytes"], 0);
    assert!(devices[0].get("process_bytes").is_none());
    assert_eq!(
        devices[0]["weight_bytes"], devices[0]["planned_weight_bytes"],
        "{devices:?}"
    );
    assert_eq!(json["memory"]["host_experts_pinned"], false);
    // The planner's weight bytes (from the GGUF tensor table) match what llama.cpp loaded.
    let planned = json["memory"]["weight_bytes"].as_f64().unwrap();
    let loaded = json["model"]["weight_bytes"].as_f64().unwrap();
    assert!(
        (planned - loaded).abs() / loaded < 0.05,
        "planned {planned} vs loaded {loaded}"
    );
    assert_eq!(json["capacity"]["context_tokens"], 2048);
    assert_eq!(json["capacity"]["free_kv_tokens"], 2048);
    assert_eq!(json["capacity"]["max_sequences"], 4);
    assert_eq!(json["load"]["active"], 0);
    assert!(!json["version"].as_str().unwrap().is_empty());

    let key = etcd.config(prefix).worker_key("w1");
    let resp = etcd.client().await.get(key.as_str(), None).await.unwrap();
    assert_ne!(resp.kvs()[0].lease(), 0, "the advert lives under a lease");

    worker.stop().await;
    assert!(
        etcd.advert(prefix, "w1").await.is_none(),
        "graceful stop deletes the advert"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_removes_the_worker_from_the_gateway_table_within_the_lease_ttl() {
    let etcd = Etcd::start().await;
    let prefix = "/t-sigkill";
    let worker = WorkerProcess::start(WorkerSpec::new("doomed", "full"), &etcd, prefix).await;
    let stop = CancellationToken::new();
    let watcher = Watcher::start(etcd.config(prefix), stop.clone())
        .await
        .unwrap();
    assert!(watcher.current().workers.contains_key("doomed"));
    worker.signal("KILL");
    let killed = Instant::now();
    let mut snapshots = watcher.snapshots();
    eventually(Duration::from_secs(10), "the advert to expire", || {
        let gone = !snapshots.borrow_and_update().workers.contains_key("doomed");
        async move { gone.then_some(()) }
    })
    .await;
    // Lease TTL is 3 s; etcd may take up to a further second to expire it.
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "took {:?}",
        killed.elapsed()
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_running_streams_then_deregisters_at_once() {
    let etcd = Etcd::start().await;
    let prefix = "/t-sigterm";
    let mut worker = WorkerProcess::start(WorkerSpec::new("leaving", "full"), &etcd, prefix).await;
    let url = format!("http://{}", worker.addr);
    let mut c = client(&url).await;
    let mut stream = c.generate(greedy(PROMPT, 48)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("first token");
    let mut tokens = first.token_ids.len();

    worker.signal("TERM");
    eventually(
        Duration::from_secs(5),
        "the advert to say draining",
        || async {
            etcd.advert(prefix, "leaving")
                .await
                .filter(|a| a.state == WorkerState::Draining)
        },
    )
    .await;
    let refused = generate(&url, greedy(PROMPT, 4))
        .await
        .expect_err("draining refuses");
    assert_eq!(refused.code(), Code::Unavailable);

    let mut last = first;
    while let Some(m) = stream.message().await.expect("stream survives the drain") {
        tokens += m.token_ids.len();
        last = m;
    }
    let ended = Instant::now();
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(tokens, 48, "the in-flight stream ran to completion");
    eventually(
        Duration::from_secs(3),
        "the advert to be deleted",
        || async { etcd.advert(prefix, "leaving").await.is_none().then_some(()) },
    )
    .await;
    assert!(ended.elapsed() < Duration::from_secs(3));
    assert_eq!(worker.wait_exit(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_drops_its_stream_stops_the_generation() {
    let etcd = Etcd::start().await;
    let prefix = "/t-drop";
    // One sequence of 2048 cells: the 1500-token request must fit a sequence's KV stream.
    let mut spec = WorkerSpec::new("w", "full");
    spec.parallel = 1;
    let worker = Worker::start(spec, Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    for url in [worker.url(), gateway.url()] {
        let mut c = client(&url).await;
        let mut stream = c.generate(greedy(PROMPT, 1500)).await.unwrap().into_inner();
        stream.message().await.unwrap().expect("first");
        stream.message().await.unwrap().expect("second");
        eventually(
            Duration::from_secs(3),
            "the sequence to show as active",
            || async {
                etcd.advert(prefix, "w")
                    .await
                    .filter(|a| a.load.active == 1)
            },
        )
        .await;
        drop(stream);
        drop(c);
        // 1500 tokens take far longer than this wait: the slot frees only if generation stopped.
        let started = Instant::now();
        let advert = eventually(
            Duration::from_secs(5),
            "the slot and KV to be freed",
            || async {
                etcd.advert(prefix, "w")
                    .await
                    .filter(|a| a.load.active == 0 && a.capacity.free_kv_tokens == 2048)
            },
        )
        .await;
        assert_eq!(advert.load.queued, 0);
        assert!(started.elapsed() < Duration::from_secs(5), "via {url}");
    }
    gateway.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_the_right_status_from_gateway_and_worker() {
    let etcd = Etcd::start().await;
    let prefix = "/t-bad";
    let worker = Worker::start(WorkerSpec::new("w", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    let cases: Vec<(&str, GenerateRequest, Code)> = vec![
        ("empty prompt", greedy("", 4), Code::InvalidArgument),
        ("max_tokens 0", greedy(PROMPT, 0), Code::InvalidArgument),
        (
            "max_tokens beyond the context",
            greedy(PROMPT, 4000),
            Code::InvalidArgument,
        ),
        (
            "max_tokens beyond the limit",
            greedy(PROMPT, 1_000_000),
            Code::InvalidArgument,
        ),
        (
            "unknown model",
            GenerateRequest {
                model: "nope".into(),
                ..greedy(PROMPT, 4)
            },
            Code::NotFound,
        ),
        (
            "message without role",
            GenerateRequest {
                messages: vec![ChatMessage {
                    role: "".into(),
                    content: "hi".into(),
                    ..Default::default()
                }],
                ..greedy("", 4)
            },
            Code::InvalidArgument,
        ),
        (
            "prompt and messages",
            GenerateRequest {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "hi".into(),
                    ..Default::default()
                }],
                ..greedy(PROMPT, 4)
            },
            Code::InvalidArgument,
        ),
    ];
    for url in [gateway.url(), worker.url()] {
        for (name, req, code) in &cases {
            let err = generate(&url, req.clone()).await.expect_err(name);
            // A worker refuses more than its own context with OUT_OF_RANGE (a larger worker may
            // take it); the gateway, which knows that none can, says INVALID_ARGUMENT.
            let code = match (*name, url == worker.url()) {
                ("max_tokens beyond the context", true) => Code::OutOfRange,
                _ => *code,
            };
            assert_eq!(err.code(), code, "{name} via {url}: {}", err.message());
            assert!(!err.message().is_empty());
        }
    }
    gateway.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_eligible_worker_is_a_fast_unavailable() {
    let etcd = Etcd::start().await;
    let gateway = Gateway::start(&etcd, "/t-empty", &[]).await;
    let started = Instant::now();
    let err = generate(&gateway.url(), greedy(PROMPT, 4))
        .await
        .expect_err("no workers");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("no workers"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(1));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_offload_fits_the_vram_budget_and_publishes_its_plan() {
    let etcd = Etcd::start().await;
    let prefix = "/t-auto";
    // At 850 MiB (weights 235 MiB, KV 45 MiB at 2048 cells, compute buffers 28 MiB with logits
    // for one row per sequence, 640 MiB of CUDA context kept free) some layers' experts must go
    // to the host, not all of them.
    let worker = Worker::start(
        WorkerSpec::new("auto", "auto").with("--vram-budget", "850MiB"),
        Some((&etcd, prefix)),
    )
    .await;
    let advert = etcd.advert(prefix, "auto").await.expect("advert");
    assert_eq!(advert.offload.profile, "auto");
    assert_eq!(advert.offload.mode, "n-cpu-moe");
    let n = advert.offload.n_cpu_moe;
    assert!(n > 0 && n < 30, "a partial placement, got {n}");
    // `moectl plan` predicts the same placement for the same budget, without loading.
    let out = std::process::Command::new(moe_e2e::bin("moectl"))
        .args(["plan", &moe_e2e::smollm2_moe().to_string_lossy()])
        .args(["--ctx", "2048", "--vram-budget", "850MiB"])
        .output()
        .expect("moectl plan");
    let text = String::from_utf8_lossy(&out.stdout);
    let planned: u32 = text
        .lines()
        .find(|l| l.starts_with("auto@"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.parse().ok()))
        .expect("an auto row");
    assert_eq!(planned, n, "{text}");
    let out = generate(&worker.url(), greedy(PROMPT, 6)).await.unwrap();
    assert!(out.text.contains("Paris"));
    worker.stop().await;
}
