//! Issue 16, etcd faults end to end (real etcd, real llama.cpp workers, a real gateway): start
//! while etcd is down (review H7), a restore from snapshot that takes the revision back (M1), and
//! etcd stalled with SIGSTOP under traffic (M2). Each bounds its waits.

use std::time::Duration;

use moe_common::pb::FinishReason;
use moe_common::registry::Watcher;
use moe_e2e::*;
use tokio_util::sync::CancellationToken;
use tonic::Code;

const PROMPT: &str = "The capital of France is";

/// The ids the registry lists under `prefix`, as a gateway sees them.
fn ids(watcher: &Watcher) -> Vec<String> {
    watcher.current().workers.keys().cloned().collect()
}

/// An 8-token greedy request through the gateway at `url`, retried until one is served (the
/// gateway's registry view converges asynchronously after an etcd fault), within `timeout`.
async fn served_eventually(url: &str, timeout: Duration, what: &str) -> Collected {
    eventually(timeout, what, || {
        let url = url.to_string();
        async move { generate(&url, greedy(PROMPT, 8)).await.ok() }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_and_worker_started_while_etcd_is_down_serve_once_it_is_up() {
    let port = free_port();
    let endpoint = Etcd::endpoint_on(port);
    let prefix = "/f-down";
    let gateway = Gateway::start_at(&endpoint, prefix, &[]).await;
    let spec = WorkerSpec::new("late", "full")
        .with("--etcd", &endpoint)
        .with("--etcd-prefix", prefix);
    // The worker loads its model and serves although it cannot register.
    let worker = Worker::start(spec, None).await;
    let direct = generate(&worker.url(), greedy(PROMPT, 4)).await;
    assert!(direct.is_ok(), "unregistered worker serves: {direct:?}");
    // The gateway serves too, refusing clearly while it knows no worker.
    let refused = eventually(Duration::from_secs(20), "the gateway to answer", || {
        let url = gateway.url();
        async move { generate(&url, greedy(PROMPT, 4)).await.err() }
    })
    .await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("no workers"),
        "{}",
        refused.message()
    );
    assert!(!gateway.exited(), "the gateway exited while etcd was down");

    let etcd = Etcd::start_on(port).await;
    let up = std::time::Instant::now();
    let out = served_eventually(
        &gateway.url(),
        Duration::from_secs(20),
        "a request through the gateway after etcd came up",
    )
    .await;
    assert!(out.text.contains("Paris"), "text was {:?}", out.text);
    assert_eq!(out.last.worker_id, "late");
    eprintln!("served {:?} after etcd came up", up.elapsed());
    assert!(etcd.advert(prefix, "late").await.is_some());
    gateway.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registry_view_converges_after_etcd_is_restored_from_an_older_snapshot() {
    let mut etcd = Etcd::start().await;
    let prefix = "/f-restore";
    let old = Worker::start(WorkerSpec::new("old", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    let stop = CancellationToken::new();
    let view = Watcher::start_retrying(etcd.config(prefix), stop.clone())
        .await
        .expect("watcher");
    eventually(Duration::from_secs(10), "the view to list `old`", || {
        let v = ids(&view);
        async move { (v == ["old"]).then_some(()) }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join("snap.db");
    etcd.snapshot_save(&snapshot);

    // After the snapshot: `old` leaves, `new` joins, and unrelated writes move the revision well
    // past the snapshot's, so a watch resumed from the cached revision would wait for ever.
    old.stop().await;
    let new = Worker::start(WorkerSpec::new("new", "full"), Some((&etcd, prefix))).await;
    let mut client = etcd.client().await;
    for i in 0..200 {
        client
            .put(format!("/f-restore-noise/{i}"), "x", None)
            .await
            .expect("noise put");
    }
    eventually(
        Duration::from_secs(10),
        "the view to list `new` only",
        || {
            let v = ids(&view);
            async move { (v == ["new"]).then_some(()) }
        },
    )
    .await;
    let before = view.current().revision;

    // Restore: `old` is back in etcd (its lease expires, nobody keeps it alive), `new` is gone
    // until its registrar notices and registers again; the revision is back at the snapshot's.
    etcd.restore(&snapshot).await;
    eventually(
        Duration::from_secs(20),
        "the view to converge on `new` after the restore",
        || {
            let v = ids(&view);
            let rev = view.current().revision;
            async move { (v == ["new"] && rev < before).then_some(()) }
        },
    )
    .await;
    let out = served_eventually(
        &gateway.url(),
        Duration::from_secs(20),
        "a request through the gateway after the restore",
    )
    .await;
    assert_eq!(out.last.worker_id, "new");
    // The gateway routes on the restored registry too: a request after the view converged on
    // `new` goes there (never to the stale `old`).
    for _ in 0..3 {
        let out = generate(&gateway.url(), greedy(PROMPT, 4))
            .await
            .expect("request after the restore");
        assert_eq!(out.last.worker_id, "new");
    }
    stop.cancel();
    gateway.stop().await;
    new.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_stalled_with_sigstop_under_traffic_loses_no_stream() {
    let etcd = Etcd::start().await;
    let prefix = "/f-stall";
    let worker = Worker::start(WorkerSpec::new("w", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    let reference = generate(&gateway.url(), greedy(PROMPT, 32))
        .await
        .expect("reference");
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let url = gateway.url();
            tokio::spawn(async move { generate(&url, greedy(PROMPT, 32)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Longer than the worker's 3 s lease TTL: the registrar's calls time out instead of hanging,
    // the lease may lapse, and the worker registers again after SIGCONT.
    etcd.signal("STOP");
    tokio::time::sleep(Duration::from_secs(4)).await;
    // New requests are placed from the gateway's last snapshot while etcd is stopped.
    let during = tokio::time::timeout(
        Duration::from_secs(30),
        generate(&gateway.url(), greedy(PROMPT, 32)),
    )
    .await
    .expect("a request during the stall ends");
    etcd.signal("CONT");
    for s in streams {
        let out = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("stream ends")
            .expect("task")
            .expect("stream served");
        assert_eq!(out.text, reference.text, "no stream altered");
        assert_eq!(out.finish(), FinishReason::Length);
    }
    let during = during.expect("request during the stall served");
    assert_eq!(during.text, reference.text);
    // After the stall the worker is (again) registered and requests keep succeeding.
    eventually(
        Duration::from_secs(15),
        "the worker's advert after SIGCONT",
        || async { etcd.advert(prefix, "w").await },
    )
    .await;
    // The test reads etcd directly; the gateway's watch may still be replaying the lapsed
    // lease's delete and the new put, so its view converges shortly after (CI once saw "no
    // workers are registered" here): requests must succeed again within the same bound.
    let after = served_eventually(
        &gateway.url(),
        Duration::from_secs(15),
        "a request served through the gateway after SIGCONT",
    )
    .await;
    assert!(after.text.contains("Paris"));
    gateway.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_killed_and_restarted_under_traffic_loses_no_stream() {
    let mut etcd = Etcd::start().await;
    let prefix = "/f-restart";
    let worker = Worker::start(WorkerSpec::new("w", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    let stop = CancellationToken::new();
    let view = Watcher::start_retrying(etcd.config(prefix), stop.clone())
        .await
        .expect("watcher");
    let reference = eventually(Duration::from_secs(10), "a first request", || {
        let url = gateway.url();
        async move { generate(&url, greedy(PROMPT, 32)).await.ok() }
    })
    .await;
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let url = gateway.url();
            tokio::spawn(async move { generate(&url, greedy(PROMPT, 32)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    etcd.kill();
    // Down for longer than a re-list backoff step; the gateway keeps its last table.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ids(&view),
        ["w"],
        "the last table is kept while etcd is down"
    );
    etcd.restart().await;
    for s in streams {
        let out = tokio::time::timeout(Duration::from_secs(60), s)
            .await
            .expect("stream ends")
            .expect("task")
            .expect("stream served");
        assert_eq!(out.text, reference.text, "no stream altered");
    }
    // The worker is registered in the restarted etcd and the watchers follow it again: a key
    // written now reaches the view (the watch was re-established, not left on a dead stream).
    eventually(
        Duration::from_secs(15),
        "the advert after the restart",
        || async { etcd.advert(prefix, "w").await },
    )
    .await;
    let mut client = etcd.client().await;
    let fake = etcd.config(prefix).worker_key("bogus");
    client.put(fake.as_str(), "{", None).await.expect("put");
    eventually(Duration::from_secs(15), "the watch to resume", || {
        let rejected = view.current().rejected.contains_key(&fake);
        async move { rejected.then_some(()) }
    })
    .await;
    let after = generate(&gateway.url(), greedy(PROMPT, 8))
        .await
        .expect("request after the restart");
    assert!(after.text.contains("Paris"));
    stop.cancel();
    gateway.stop().await;
    worker.stop().await;
}
