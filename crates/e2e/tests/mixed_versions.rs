//! A mixed-version fleet (issue 15): a gateway sends a request that needs a feature (here a chat
//! request, which needs the model's chat template) only to workers whose advert lists it. The
//! "old" worker is a real worker's advert as a moe-worker older than the `features` field
//! writes it (the same JSON without the field); the real worker behind it serves plain prompts.

use std::time::Duration;

use moe_common::pb::{ChatMessage, GenerateRequest};
use moe_e2e::*;
use tonic::Code;

fn chat() -> GenerateRequest {
    GenerateRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "Say hello.".into(),
            ..Default::default()
        }],
        ..greedy("", 4)
    }
}

/// Writes the advert of `id` from `from` under `prefix` as worker `as_id`, with or without
/// its `features`. No lease: it stays until the test ends.
async fn put_advert(etcd: &Etcd, from: &str, id: &str, to: &str, as_id: &str, features: bool) {
    let mut json = etcd
        .advert_json(from, id)
        .await
        .expect("the worker's advert");
    let obj = json.as_object_mut().expect("an object");
    assert!(
        obj.contains_key("features"),
        "a current worker lists features"
    );
    if !features {
        obj.remove("features");
    }
    obj.insert("id".into(), as_id.into());
    let key = etcd.config(to).worker_key(as_id);
    etcd.client()
        .await
        .put(key, json.to_string(), None)
        .await
        .expect("put advert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_needing_a_feature_no_worker_has_is_unavailable_naming_it() {
    let etcd = Etcd::start().await;
    // The real worker registers under its own prefix; the gateway's prefix holds copies of its
    // advert.
    let worker = Worker::start(WorkerSpec::new("w", "full"), Some((&etcd, "/mv-real"))).await;
    have_free_kv(&etcd, "/mv-real", &["w"]).await;
    let prefix = "/mv";
    put_advert(&etcd, "/mv-real", "w", prefix, "old", false).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;

    // A plain prompt needs no feature: the old worker serves it.
    let plain = eventually(Duration::from_secs(10), "a plain prompt served", || async {
        generate(&gateway.url(), greedy("Hello", 4)).await.ok()
    })
    .await;
    assert_eq!(plain.token_ids.len(), 4);

    // A chat request needs the chat template: refused, naming the feature.
    let e = generate(&gateway.url(), chat())
        .await
        .expect_err("no worker renders chat templates");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("chat_template"), "{}", e.message());
    assert!(e.message().contains("1 worker(s)"), "{}", e.message());

    // A worker of this version joins: chat requests go there.
    put_advert(&etcd, "/mv-real", "w", prefix, "new", true).await;
    let served = eventually(
        Duration::from_secs(10),
        "the chat request served",
        || async { generate(&gateway.url(), chat()).await.ok() },
    )
    .await;
    assert!(!served.token_ids.is_empty());
    gateway.stop().await;
    worker.stop().await;
}
