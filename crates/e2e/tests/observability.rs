//! Issue 6: one connected trace per request from the client through the gateway into the
//! worker's decode loop (OTLP to a real collector), and Prometheus counters that move by exactly
//! what known requests did.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use moe_common::pb::{FinishReason, GenerateRequest};
use moe_common::telemetry::propagation::traceparent;
use moe_e2e::observe::{Collector, ExportedSpan, Metrics, ProcessTracing, process_tracing, scrape};
use moe_e2e::*;

const PROMPT: &str = "The capital of France is";

/// A fresh W3C trace id and parent span id, as the client of a traced request.
fn client_ids() -> (String, String) {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let trace = format!("{:032x}", nanos ^ 0x5eed_0000_0000_0000_0000_0000_0000_0001);
    let span = format!("{:016x}", (nanos as u64) | 1);
    (trace, span)
}

/// Sends `req` with a `traceparent` header and collects the stream.
async fn traced(url: &str, req: GenerateRequest, trace: &str, parent: &str) -> Collected {
    let mut c = client(url).await;
    let mut request = tonic::Request::new(req);
    request
        .metadata_mut()
        .insert("traceparent", traceparent(trace, parent).parse().unwrap());
    let fut = async {
        let mut stream = c.generate(request).await?.into_inner();
        let mut out = Collected::default();
        while let Some(m) = stream.message().await? {
            out.token_ids.extend_from_slice(&m.token_ids);
            out.text.push_str(&m.text);
            let last = m.finish_reason != FinishReason::Unspecified as i32;
            out.last = m;
            if last {
                break;
            }
        }
        Ok::<_, tonic::Status>(out)
    };
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .expect("stream within 120 s")
        .expect("stream ok")
}

/// The single span called `name` in `spans`.
fn one<'a>(spans: &'a [ExportedSpan], name: &str) -> &'a ExportedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span in {spans:#?}");
    found[0]
}

fn assert_child(child: &ExportedSpan, parent: &ExportedSpan) {
    assert_eq!(
        child.parent_span_id, parent.span_id,
        "{} is a child of {}",
        child.name, parent.name
    );
    assert_eq!(child.trace_id, parent.trace_id);
}

/// Follows parent links from `span` up to the root of its trace, returning the names on the way.
fn ancestry(span: &ExportedSpan, spans: &[ExportedSpan]) -> Vec<String> {
    let by_id: HashMap<&str, &ExportedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let mut names = vec![];
    let mut cur = span;
    while let Some(p) = by_id.get(cur.parent_span_id.as_str()) {
        names.push(p.name.clone());
        cur = p;
    }
    names
}

/// Flushes and polls the collector until the trace has a span of each name (bounded by 20 s).
async fn wait_for_spans(
    tracing: &'static ProcessTracing,
    trace: &str,
    names: &[&str],
) -> Vec<ExportedSpan> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tracing.flush().await;
        let spans = tracing.collector.trace(trace);
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for spans {names:?} of trace {trace}; got {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_from_the_client_into_the_decode_loop() {
    let tracing = process_tracing();
    let etcd = Etcd::start().await;
    let prefix = "/t-otel";
    let worker = Worker::start(WorkerSpec::new("traced", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    eventually(Duration::from_secs(10), "gateway to see the worker", || {
        let url = gateway.url();
        async move { generate(&url, greedy(PROMPT, 1)).await.ok() }
    })
    .await;

    let (trace, client_span) = client_ids();
    let out = traced(&gateway.url(), greedy(PROMPT, 6), &trace, &client_span).await;
    assert_eq!(out.finish(), FinishReason::Length);
    assert_eq!(out.token_ids.len(), 6);

    let names = [
        "gateway.grpc",
        "gateway.request",
        "gateway.schedule",
        "gateway.attempt",
        "worker.request",
        "worker.queue",
        "worker.prefill",
        "worker.decode",
    ];
    let spans = wait_for_spans(tracing, &trace, &names).await;

    // Client → gateway: the gateway's server span continues the client's trace.
    let grpc = one(&spans, "gateway.grpc");
    assert_eq!(grpc.parent_span_id, client_span);
    let request = one(&spans, "gateway.request");
    assert_child(request, grpc);
    assert_child(one(&spans, "gateway.schedule"), request);
    let attempt = one(&spans, "gateway.attempt");
    assert_child(attempt, request);
    assert_eq!(attempt.attributes["worker"], "traced");
    assert_eq!(attempt.attributes["profile"], "full");
    // Gateway → worker over gRPC metadata.
    let wreq = one(&spans, "worker.request");
    assert_child(wreq, attempt);
    for phase in ["worker.queue", "worker.prefill", "worker.decode"] {
        assert_child(one(&spans, phase), wreq);
    }
    assert_eq!(
        ancestry(one(&spans, "worker.decode"), &spans),
        [
            "worker.request",
            "gateway.attempt",
            "gateway.request",
            "gateway.grpc"
        ]
    );
    assert!(
        spans.iter().all(|s| s.trace_id == trace),
        "one trace id throughout"
    );
    assert!(
        !spans.iter().any(|s| s.name == "gateway.migration"),
        "no migration happened"
    );

    // The engine's steps link to the sequence they served: one prefill step and a decode step
    // per further token at least.
    let steps: Vec<ExportedSpan> = tracing
        .collector
        .spans()
        .into_iter()
        .filter(|s| s.name == "engine.step")
        .filter(|s| s.links.contains(&(trace.clone(), wreq.span_id.clone())))
        .collect();
    assert!(
        steps.len() >= 6,
        "at least 6 engine steps linked to the request, got {}",
        steps.len()
    );

    gateway.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_process_exports_its_spans_under_the_gateway_attempt() {
    let tracing = process_tracing();
    // A collector of the worker process's own, so its spans are told apart by destination too.
    let collector = Collector::start().await;
    let etcd = Etcd::start().await;
    let prefix = "/t-otel-proc";
    let mut worker = WorkerProcess::start(
        WorkerSpec::new("exporter", "full")
            .with("--otlp-endpoint", &collector.endpoint())
            .with("--otel-service-name", "worker-under-test"),
        &etcd,
        prefix,
    )
    .await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    let (trace, client_span) = client_ids();
    let out = eventually(
        Duration::from_secs(10),
        "a traced request to succeed",
        || {
            let (url, trace, client_span) = (gateway.url(), trace.clone(), client_span.clone());
            async move {
                let mut c = client(&url).await;
                let mut request = tonic::Request::new(greedy(PROMPT, 3));
                request.metadata_mut().insert(
                    "traceparent",
                    traceparent(&trace, &client_span).parse().unwrap(),
                );
                let mut stream = c.generate(request).await.ok()?.into_inner();
                let mut n = 0;
                while let Some(m) = stream.message().await.ok()? {
                    n += m.token_ids.len();
                }
                Some(n)
            }
        },
    )
    .await;
    assert_eq!(out, 3);
    // SIGTERM: the worker drains and flushes its spans before exiting.
    worker.signal("TERM");
    assert_eq!(worker.wait_exit(Duration::from_secs(60)).await, Some(0));
    tracing.flush().await;

    let worker_spans = collector.trace(&trace);
    let wreq = one(&worker_spans, "worker.request");
    assert_eq!(wreq.service, "worker-under-test");
    let gateway_spans = tracing.collector.trace(&trace);
    let attempts: Vec<_> = gateway_spans
        .iter()
        .filter(|s| s.name == "gateway.attempt")
        .collect();
    assert!(
        attempts.iter().any(|a| a.span_id == wreq.parent_span_id),
        "the worker's request span is a child of a gateway attempt: {wreq:?} vs {attempts:?}"
    );
    assert_eq!(attempts[0].service, "moe-e2e");
    for phase in ["worker.queue", "worker.prefill", "worker.decode"] {
        assert_child(one(&worker_spans, phase), wreq);
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_exactly_what_requests_did() {
    let etcd = Etcd::start().await;
    let prefix = "/t-metrics";
    let wport = free_port();
    let gport = free_port();
    let worker = Worker::start(
        WorkerSpec::new("metered", "full").with("--metrics-listen", &format!("127.0.0.1:{wport}")),
        Some((&etcd, prefix)),
    )
    .await;
    let gaddr = format!("127.0.0.1:{gport}");
    let gateway = Gateway::start(&etcd, prefix, &["--metrics-listen", &gaddr]).await;
    let waddr = format!("127.0.0.1:{wport}").parse().unwrap();
    let gaddr = gaddr.parse().unwrap();

    // The registry and the worker's gauges before any request.
    let w0 = eventually(Duration::from_secs(10), "worker gauges", || async move {
        let m = scrape(waddr).await;
        (m.sum("moe_worker_registered", &[]) == 1.0).then_some(m)
    })
    .await;
    assert_eq!(w0.sum("moe_worker_kv_capacity_tokens", &[]), 2048.0);
    assert_eq!(w0.sum("moe_worker_kv_free_tokens", &[]), 2048.0);
    assert_eq!(w0.sum("moe_worker_kv_utilization", &[]), 0.0);
    assert_eq!(w0.sum("moe_worker_max_sequences", &[]), 4.0);
    assert_eq!(w0.sum("moe_worker_state", &[("state", "ready")]), 1.0);
    assert_eq!(w0.sum("moe_worker_state", &[("state", "draining")]), 0.0);
    assert_eq!(w0.sum("moe_worker_registrations_total", &[]), 1.0);
    assert!(w0.has("moe_worker_device_memory_total_bytes"));
    assert!(w0.sum("moe_worker_device_weight_bytes", &[]) > 0.0);
    let labelled =
        w0.0.iter()
            .find(|s| s.name == "moe_worker_queue_depth")
            .expect("queue depth");
    assert_eq!(labelled.labels["worker"], "metered");
    assert_eq!(labelled.labels["profile"], "full");
    // The same fleet through `moectl top --once`.
    let top = tokio::process::Command::new(bin("moectl"))
        .args([
            "top",
            "--once",
            "--etcd",
            &etcd.endpoint,
            "--etcd-prefix",
            prefix,
        ])
        .output()
        .await
        .expect("run moectl top");
    let frame = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "moectl top: {top:?}");
    let row = frame
        .lines()
        .find(|l| l.starts_with("metered"))
        .unwrap_or_else(|| panic!("a row for the worker in:\n{frame}"));
    for cell in ["ready", "full", "2048/2048 100%", "0/4"] {
        assert!(row.contains(cell), "{cell:?} in {row:?}");
    }
    let g0 = eventually(
        Duration::from_secs(10),
        "gateway to see the worker",
        || async move {
            let m = scrape(gaddr).await;
            (m.sum(
                "moe_registry_workers",
                &[("profile", "full"), ("state", "ready")],
            ) == 1.0)
                .then_some(m)
        },
    )
    .await;

    // Three requests that succeed and one for a model nobody serves.
    let mut tokens = 0.0;
    let mut prompt_tokens = 0.0;
    for max in [3, 5, 7] {
        let out = generate(&gateway.url(), greedy(PROMPT, max)).await.unwrap();
        assert_eq!(out.token_ids.len(), max as usize, "no early stop");
        tokens += out.token_ids.len() as f64;
        prompt_tokens += out.last.usage.unwrap().prompt_tokens as f64;
    }
    let mut missing = greedy(PROMPT, 3);
    missing.model = "no-such-model".into();
    let err = generate(&gateway.url(), missing).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let delta = |after: &Metrics, before: &Metrics, name: &str, labels: &[(&str, &str)]| {
        after.sum(name, labels) - before.sum(name, labels)
    };
    let model = &[("model", "smollm2-moe-4x2")][..];
    // Streams end a moment after the client has its final message: wait for the counts.
    let before = g0.sum("moe_requests_total", &[]);
    let g1 = eventually(Duration::from_secs(10), "gateway counters", || async move {
        let m = scrape(gaddr).await;
        (m.sum("moe_requests_total", &[]) - before >= 4.0).then_some(m)
    })
    .await;
    let ok = &[("outcome", "ok"), ("class", "interactive")][..];
    assert_eq!(delta(&g1, &g0, "moe_requests_total", ok), 3.0);
    assert_eq!(delta(&g1, &g0, "moe_requests_total", model), 3.0);
    assert_eq!(
        delta(
            &g1,
            &g0,
            "moe_requests_total",
            &[("outcome", "not_found"), ("model", "none")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &g1,
            &g0,
            "moe_generated_tokens_total",
            &[("profile", "full")]
        ),
        tokens
    );
    assert_eq!(
        delta(&g1, &g0, "moe_time_to_first_token_seconds_count", &[]),
        3.0
    );
    assert_eq!(
        delta(&g1, &g0, "moe_inter_token_latency_seconds_count", &[]),
        tokens - 3.0,
        "one observation per token after the first"
    );
    assert_eq!(
        delta(
            &g1,
            &g0,
            "moe_scheduler_decisions_total",
            &[("decision", "preferred")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &g1,
            &g0,
            "moe_scheduler_decisions_total",
            &[("decision", "model_not_found")]
        ),
        1.0
    );
    assert_eq!(delta(&g1, &g0, "moe_retries_total", &[]), 0.0);
    assert_eq!(delta(&g1, &g0, "moe_migrations_total", &[]), 0.0);
    assert_eq!(delta(&g1, &g0, "moe_spillovers_total", &[]), 0.0);
    assert_eq!(g1.sum("moe_gateway_in_flight_requests", &[]), 0.0);

    let before = w0.sum("moe_worker_requests_total", &[]);
    let w1 = eventually(Duration::from_secs(10), "worker counters", || async move {
        let m = scrape(waddr).await;
        let done = m.sum("moe_worker_requests_total", &[]) - before;
        (done >= 3.0 && m.sum("moe_worker_active_sequences", &[]) == 0.0).then_some(m)
    })
    .await;
    assert_eq!(
        delta(&w1, &w0, "moe_worker_requests_total", &[("outcome", "ok")]),
        3.0
    );
    assert_eq!(delta(&w1, &w0, "moe_worker_requests_total", &[]), 3.0);
    assert_eq!(
        delta(
            &w1,
            &w0,
            "moe_worker_generated_tokens_total",
            &[("class", "interactive")]
        ),
        tokens
    );
    assert_eq!(
        delta(&w1, &w0, "moe_worker_prompt_tokens_total", &[]),
        prompt_tokens
    );
    assert_eq!(
        delta(
            &w1,
            &w0,
            "moe_worker_time_to_first_token_seconds_count",
            &[]
        ),
        3.0
    );
    assert_eq!(
        delta(&w1, &w0, "moe_worker_queue_wait_seconds_count", &[]),
        3.0
    );
    assert_eq!(
        delta(
            &w1,
            &w0,
            "moe_worker_inter_token_latency_seconds_count",
            &[]
        ),
        tokens - 3.0
    );
    assert_eq!(w1.sum("moe_worker_queue_depth", &[]), 0.0);
    assert!(w1.sum("moe_worker_decode_tokens_per_second", &[]) > 0.0);

    gateway.stop().await;
    worker.stop().await;
}
