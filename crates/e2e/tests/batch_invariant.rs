//! `batch_invariant` end to end: real etcd, two real llama.cpp workers on the SmolLM2 MoE (CPU),
//! a real gateway (gRPC and the OpenAI HTTP API). One worker runs with `--kv-unified` (its
//! sequences share one KV cache, batched decode: not batch-invariant), the other with
//! per-sequence KV streams and `--decode-mode sequential` (batch-invariant). Requests that set `batch_invariant` land on
//! the invariant worker only, even though the other one is the preferred pool for their class;
//! with only the `--kv-unified` worker left they fail with FAILED_PRECONDITION (HTTP 400) naming
//! the field; requests without it may land on either and their final message says which.

use std::time::Duration;

use moe_common::pb::{FinishReason, GenerateRequest};
use moe_e2e::*;
use tonic::Code;

const PROMPT: &str = "The capital of France is";
const MODEL: &str = "smollm2-moe-4x2";

fn invariant(mut req: GenerateRequest) -> GenerateRequest {
    req.batch_invariant = true;
    req
}

/// POSTs `body` to `path` on the gateway's HTTP API; (status, lower-cased head, JSON body).
async fn post_json(addr: &str, path: &str, body: &str) -> (u16, String, serde_json::Value) {
    let reply = http_post(addr, path, body, None).await;
    let json =
        serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {:?}", reply.body));
    (reply.status, reply.head, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_invariant_requests_land_only_on_batch_invariant_workers() {
    let etcd = Etcd::start().await;
    let prefix = "/t-batch-invariant";
    // The `--kv-unified` worker is the full-GPU profile, which INTERACTIVE requests prefer: only
    // the field keeps them off it. The invariant worker is reached by spill-over.
    let mut unified_spec = WorkerSpec::new("unified", "full");
    unified_spec.extra.extend([
        "--kv-unified".into(),
        "--decode-mode".into(),
        "batched".into(),
    ]);
    let unified = Worker::start(unified_spec, Some((&etcd, prefix))).await;
    // The invariant worker decodes sequentially: on the CPU, batched decode is not
    // batch-invariant (ggml-cpu multiplies one row and several rows with different kernels).
    let mut inv_spec = WorkerSpec::new("inv", "cpu-moe");
    inv_spec
        .extra
        .extend(["--decode-mode".into(), "sequential".into()]);
    let inv = Worker::start(inv_spec, Some((&etcd, prefix))).await;
    let http = format!("127.0.0.1:{}", free_port());
    let gateway = Gateway::start(&etcd, prefix, &["--http-listen", &http]).await;
    let url = gateway.url();
    have_free_kv(&etcd, prefix, &["unified", "inv"]).await;

    // What each worker advertises: one decodes batched with a shared KV cache, the other
    // sequentially with a KV stream per sequence.
    let a_unified = etcd.advert(prefix, "unified").await.expect("advert");
    let a_inv = etcd.advert(prefix, "inv").await.expect("advert");
    assert_eq!(a_unified.decode_mode.as_deref(), Some("batched"));
    assert_eq!(a_inv.decode_mode.as_deref(), Some("sequential"));
    assert_eq!(a_unified.batch_invariant, Some(false));
    assert_eq!(a_inv.batch_invariant, Some(true));

    // The gateway sees both workers once a request needing the invariant one is served.
    eventually(
        Duration::from_secs(10),
        "the gateway to place on the invariant worker",
        || {
            let url = url.clone();
            async move {
                generate(&url, invariant(greedy(PROMPT, 2)))
                    .await
                    .ok()
                    .map(|_| ())
            }
        },
    )
    .await;
    let mut fingerprints = std::collections::HashSet::new();
    for i in 0..4 {
        let mut req = invariant(greedy(PROMPT, 4));
        req.request_id = format!("inv-{i}");
        let out = generate(&url, req).await.expect("served");
        assert_eq!(out.last.worker_id, "inv", "request {i}");
        assert!(out.last.batch_invariant, "request {i}");
        assert!(
            out.last.system_fingerprint.starts_with("fp_"),
            "{:?}",
            out.last
        );
        assert_eq!(out.finish(), FinishReason::Length);
        fingerprints.insert(out.last.system_fingerprint.clone());
    }
    assert_eq!(fingerprints.len(), 1, "one configuration, one fingerprint");

    // Without the field: the preferred (unified) worker, and the final message says the truth.
    let plain = generate(&url, greedy(PROMPT, 4)).await.expect("served");
    let expected = match plain.last.worker_id.as_str() {
        "unified" => false,
        "inv" => true,
        other => panic!("unknown worker {other}"),
    };
    assert_eq!(plain.last.batch_invariant, expected, "{:?}", plain.last);
    if !expected {
        assert!(!fingerprints.contains(&plain.last.system_fingerprint));
    }

    // Straight to the workers (no gateway): the unified one refuses, the other serves.
    let err = generate(&unified.url(), invariant(greedy(PROMPT, 2)))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().starts_with("batch_invariant: "), "{err:?}");
    let direct = generate(&inv.url(), invariant(greedy(PROMPT, 2)))
        .await
        .expect("served");
    assert!(direct.last.batch_invariant);

    // The OpenAI HTTP API: the extension field is accepted, the answer names the worker and
    // carries its system fingerprint.
    let body = format!(
        r#"{{"model": "{MODEL}", "prompt": "{PROMPT}", "max_tokens": 3, "temperature": 0, "batch_invariant": true}}"#
    );
    let (code, head, json) = post_json(&http, "/v1/completions", &body).await;
    assert_eq!(code, 200, "{json}");
    assert!(head.contains("x-moe-worker-id: inv"), "{head}");
    assert!(head.contains("x-moe-batch-invariant: true"), "{head}");
    assert!(
        fingerprints.contains(json["system_fingerprint"].as_str().unwrap_or("")),
        "{json}"
    );

    // Only the unified worker left: refused, naming the field, never served elsewhere.
    inv.stop().await;
    let mut req = invariant(greedy(PROMPT, 2));
    req.model = MODEL.into();
    let err = eventually(
        Duration::from_secs(10),
        "the gateway to see the invariant worker gone",
        || {
            let (url, req) = (url.clone(), req.clone());
            async move {
                generate(&url, req)
                    .await
                    .err()
                    .filter(|e| e.code() == Code::FailedPrecondition)
            }
        },
    )
    .await;
    let msg = err.message();
    assert!(msg.starts_with("batch_invariant: "), "{msg}");
    assert!(
        msg.contains(&format!(
            "no worker serving model \"{MODEL}\" guarantees batch-invariant output"
        )),
        "{msg}"
    );
    let (code, _, json) = post_json(&http, "/v1/chat/completions", &format!(
        r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 2, "batch_invariant": true}}"#
    ))
    .await;
    assert_eq!(code, 400, "{json}");
    assert_eq!(json["error"]["param"], "batch_invariant", "{json}");
    assert_eq!(json["error"]["code"], "failed_precondition", "{json}");
    // A request without the field is still served, and says it is not batch-invariant.
    let plain = generate(&url, greedy(PROMPT, 2)).await.expect("served");
    assert_eq!(plain.last.worker_id, "unified");
    assert!(!plain.last.batch_invariant);

    gateway.stop().await;
    unified.stop().await;
}
