//! Gateway side of the registry: one task lists and watches the workers prefix, re-lists after
//! compaction or error, and publishes an immutable [`ClusterSnapshot`] for lock-free reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{EtcdConfig, RegistryError, WorkerAdvert};

/// Every valid advert under the prefix at one etcd revision.
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub revision: i64,
    /// Valid adverts by worker id.
    pub workers: BTreeMap<String, Arc<WorkerAdvert>>,
    /// Keys whose value failed validation (never routed to).
    pub rejected: BTreeMap<String, String>,
}

impl ClusterSnapshot {
    fn apply_put(&mut self, key: &str, value: &[u8]) {
        let id = key.rsplit('/').next().unwrap_or_default().to_string();
        match WorkerAdvert::from_json(key, value) {
            Ok(advert) => {
                self.rejected.remove(key);
                self.workers.insert(id, Arc::new(advert));
            }
            Err(e) => {
                if self.rejected.get(key) != Some(&e.to_string()) {
                    tracing::warn!(%key, error = %e, "ignoring invalid worker advert");
                }
                self.workers.remove(&id);
                self.rejected.insert(key.to_string(), e.to_string());
            }
        }
    }

    fn apply_delete(&mut self, key: &str) {
        let id = key.rsplit('/').next().unwrap_or_default();
        self.workers.remove(id);
        self.rejected.remove(key);
    }
}

/// Handle on the watcher task.
pub struct Watcher {
    snapshots: watch::Receiver<Arc<ClusterSnapshot>>,
}

impl Watcher {
    /// Connects, lists the prefix once (so the first snapshot is complete), then watches in the
    /// background until `stop` is cancelled.
    pub async fn start(
        config: EtcdConfig,
        stop: CancellationToken,
    ) -> Result<Watcher, RegistryError> {
        let mut client = config.connect().await?;
        let prefix = config.workers_prefix();
        let first = list(&mut client, &prefix)
            .await
            .map_err(|e| e.explain(&config))?;
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(run(client, prefix, tx, stop));
        Ok(Watcher { snapshots: rx })
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<ClusterSnapshot>> {
        self.snapshots.clone()
    }

    pub fn current(&self) -> Arc<ClusterSnapshot> {
        self.snapshots.borrow().clone()
    }
}

async fn list(client: &mut Client, prefix: &str) -> Result<ClusterSnapshot, RegistryError> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let mut snap = ClusterSnapshot {
        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        ..Default::default()
    };
    for kv in resp.kvs() {
        snap.apply_put(&String::from_utf8_lossy(kv.key()), kv.value());
    }
    Ok(snap)
}

async fn run(
    mut client: Client,
    prefix: String,
    tx: watch::Sender<Arc<ClusterSnapshot>>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let start = tx.borrow().revision + 1;
        tokio::select! {
            _ = stop.cancelled() => return,
            result = watch_from(&mut client, &prefix, start, &tx) => {
                match result {
                    Ok(()) => tracing::info!("registry watch ended; re-listing"),
                    Err(e) => tracing::warn!(error = %e, "registry watch failed; re-listing"),
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        match list(&mut client, &prefix).await {
            Ok(snap) => {
                backoff = Duration::from_millis(100);
                tx.send_replace(Arc::new(snap));
            }
            Err(e) => {
                tracing::warn!(error = %e, "registry re-list failed");
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Applies watch events to the published snapshot until the watch ends (compaction, cancel,
/// error). Returns so the caller re-lists.
async fn watch_from(
    client: &mut Client,
    prefix: &str,
    start_revision: i64,
    tx: &watch::Sender<Arc<ClusterSnapshot>>,
) -> Result<(), RegistryError> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start_revision);
    let mut stream = client.watch(prefix, Some(opts)).await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() || resp.compact_revision() > 0 {
            tracing::info!(
                compact = resp.compact_revision(),
                reason = resp.cancel_reason(),
                "watch cancelled"
            );
            return Ok(());
        }
        if resp.events().is_empty() {
            continue;
        }
        let mut snap = ClusterSnapshot::clone(&tx.borrow());
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            match event.event_type() {
                EventType::Put => snap.apply_put(&key, kv.value()),
                EventType::Delete => snap.apply_delete(&key),
            }
            snap.revision = snap.revision.max(kv.mod_revision());
        }
        if let Some(h) = resp.header() {
            snap.revision = snap.revision.max(h.revision());
        }
        tx.send_replace(Arc::new(snap));
    }
    Ok(())
}
