//! Issue 14: the advert's `model_fingerprint` names the model file, not the worker — the same
//! GGUF under different offload profiles has one fingerprint, another GGUF another.

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
    let mut fingerprints = Vec::new();
    for id in ["fp-full", "fp-cpu-moe", "fp-tiny"] {
        let advert = eventually(Duration::from_secs(10), "advert", || async {
            etcd.advert(prefix, id).await
        })
        .await;
        fingerprints.push(advert.model_fingerprint);
    }
    assert!(
        fingerprints[0].starts_with("v1-") && fingerprints[0].len() == 35,
        "{fingerprints:?}"
    );
    assert_eq!(fingerprints[0], fingerprints[1], "same file, other profile");
    assert_ne!(fingerprints[0], fingerprints[2], "another model file");
    for w in [full, offload, tiny] {
        w.stop().await;
    }
}
