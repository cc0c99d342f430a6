//! Issue 14: the advert's `model_fingerprint` names the model file, not the worker — the same
//! GGUF under different offload profiles has one fingerprint, another GGUF another. Issue 18: a
//! quantized KV cache (`--cache-type-k/-v q8_0`) computes other numbers, so its worker gets a
//! fingerprint of its own (streams never move between it and F16 workers), plans 34/64 of the
//! F16 KV bytes, and serves.

use std::time::Duration;

use moe_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_model_file_has_one_fingerprint_whatever_the_profile() {
    let etcd = Etcd::start().await;
    let prefix = "/t-fingerprint";
    let full = Worker::start(WorkerSpec::new("fp-full", "full"), Some((&etcd, prefix))).await;
    let offload = Worker::start(
        WorkerSpec {
            ctx_size: 1024,
            parallel: 2,
            ..WorkerSpec::new("fp-cpu-moe", "cpu-moe")
        },
        Some((&etcd, prefix)),
    )
    .await;
    let tiny = Worker::start(
        WorkerSpec::new("fp-tiny", "full").with_model(tiny_moe()),
        Some((&etcd, prefix)),
    )
    .await;
    let q8 = Worker::start(
        WorkerSpec::new("fp-q8", "full")
            .with("--cache-type-k", "q8_0")
            .with("--cache-type-v", "q8_0"),
        Some((&etcd, prefix)),
    )
    .await;
    let mut fingerprints = Vec::new();
    let mut adverts = Vec::new();
    for id in ["fp-full", "fp-cpu-moe", "fp-tiny", "fp-q8"] {
        let advert = eventually(Duration::from_secs(10), "advert", || async {
            etcd.advert(prefix, id).await
        })
        .await;
        fingerprints.push(advert.model_fingerprint.clone());
        adverts.push(advert);
    }
    assert!(
        fingerprints[0].starts_with("v1-") && fingerprints[0].len() == 35,
        "{fingerprints:?}"
    );
    assert_eq!(fingerprints[0], fingerprints[1], "same file, other profile");
    assert_ne!(fingerprints[0], fingerprints[2], "another model file");
    assert_eq!(
        fingerprints[3],
        format!("{}+kv-q8_0-q8_0", fingerprints[0]),
        "same file, quantized KV cache"
    );
    let (f16, q8_0) = (&adverts[0].memory, &adverts[3].memory);
    assert_eq!(
        (f16.cache_type_k.as_str(), f16.cache_type_v.as_str()),
        ("f16", "f16")
    );
    assert_eq!(
        (q8_0.cache_type_k.as_str(), q8_0.cache_type_v.as_str()),
        ("q8_0", "q8_0")
    );
    // Same cells and streams: each row of 32-value blocks takes 34 bytes instead of 64.
    assert_eq!(q8_0.kv_bytes * 64, f16.kv_bytes * 34, "{f16:?} {q8_0:?}");
    // It serves, and greedy output stays batch-invariant with a quantized cache: a prompt's 64
    // tokens alone equal its 64 tokens next to three other prompts.
    let prompts: [&'static str; 4] = [
        "Once upon a time, in a small village by the sea,",
        "The capital of France is",
        "Water boils at a temperature of",
        "Here is a short poem about the moon:",
    ];
    let solo = generate(&q8.url(), greedy(prompts[0], 64))
        .await
        .expect("the q8_0 worker serves");
    assert_eq!(solo.token_ids.len(), 64, "{solo:?}");
    let mut set = tokio::task::JoinSet::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let url = q8.url();
        set.spawn(async move { (i, generate(&url, greedy(p, 64)).await) });
    }
    let mut together = vec![None; prompts.len()];
    while let Some(done) = set.join_next().await {
        let (i, out) = done.expect("task");
        together[i] = Some(out.expect("served together").token_ids);
    }
    assert_eq!(
        together[0].as_ref(),
        Some(&solo.token_ids),
        "q8_0 KV: batch-invariant"
    );
    for w in [full, offload, tiny, q8] {
        w.stop().await;
    }
}
