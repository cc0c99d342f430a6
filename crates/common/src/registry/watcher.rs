//! Gateway side of the registry: one task lists and watches the workers prefix, re-lists after
//! compaction or error, and publishes an immutable [`ClusterSnapshot`] for lock-free reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
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
    /// background until `stop` is cancelled. Fails when etcd cannot be reached: for tools
    /// (`moectl`) whose answer is wrong without etcd. A server uses [`Watcher::start_retrying`].
    pub async fn start(
        config: EtcdConfig,
        stop: CancellationToken,
    ) -> Result<Watcher, RegistryError> {
        let (client, first) = connect_and_list(&config).await?;
        let (tx, rx) = watch::channel(Arc::new(first.snapshot));
        tokio::spawn(run(config, Some((client, first.cluster_id)), tx, stop));
        Ok(Watcher { snapshots: rx })
    }

    /// Like [`Watcher::start`], but an unreachable etcd is not fatal: the watcher starts with an
    /// empty snapshot (revision 0: no workers known, so nothing is routed) and keeps connecting
    /// in the background with backoff, logging each failure. Only a refusal of the credentials
    /// ([`RegistryError::Auth`]), which retrying cannot fix, is returned.
    pub async fn start_retrying(
        config: EtcdConfig,
        stop: CancellationToken,
    ) -> Result<Watcher, RegistryError> {
        let (tx, rx) = watch::channel(Arc::new(ClusterSnapshot::default()));
        let connected = match connect_and_list(&config).await {
            Ok((client, first)) => {
                tx.send_replace(Arc::new(first.snapshot));
                Some((client, first.cluster_id))
            }
            Err(e @ RegistryError::Auth { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "etcd unreachable at start: no workers known until it answers; retrying in the background"
                );
                None
            }
        };
        tokio::spawn(run(config, connected, tx, stop));
        Ok(Watcher { snapshots: rx })
    }

    pub fn snapshots(&self) -> watch::Receiver<Arc<ClusterSnapshot>> {
        self.snapshots.clone()
    }

    pub fn current(&self) -> Arc<ClusterSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// Whether the registry has been listed at least once (a snapshot of revision 0 is the
    /// empty one [`Watcher::start_retrying`] begins with).
    pub fn synced(&self) -> bool {
        self.snapshots.borrow().revision > 0
    }
}

/// One complete listing and the etcd cluster that answered it.
struct Listing {
    snapshot: ClusterSnapshot,
    cluster_id: u64,
}

async fn connect_and_list(config: &EtcdConfig) -> Result<(Client, Listing), RegistryError> {
    let mut client = config.connect().await?;
    let first = list(&mut client, config)
        .await
        .map_err(|e| e.explain(config))?;
    Ok((client, first))
}

/// Lists the workers prefix, bounded by the connect timeout.
async fn list(client: &mut Client, config: &EtcdConfig) -> Result<Listing, RegistryError> {
    let prefix = config.workers_prefix();
    let get = client.get(prefix, Some(GetOptions::new().with_prefix()));
    let resp = tokio::time::timeout(config.connect_timeout, get)
        .await
        .map_err(|_| config.timeout())??;
    let mut snap = ClusterSnapshot {
        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        ..Default::default()
    };
    for kv in resp.kvs() {
        snap.apply_put(&String::from_utf8_lossy(kv.key()), kv.value());
    }
    Ok(Listing {
        snapshot: snap,
        cluster_id: resp.header().map(|h| h.cluster_id()).unwrap_or(0),
    })
}

/// Lists, then watches from the listed revision; after anything that ends a watch (error,
/// compaction, cancel, a revision that went backwards, another cluster) it lists again *before*
/// watching again, so a watch never waits on a revision the store will not reach (review M1:
/// after a restore from snapshot the revision goes back). The last snapshot is kept while etcd
/// is unreachable.
async fn run(
    config: EtcdConfig,
    mut connected: Option<(Client, u64)>,
    tx: watch::Sender<Arc<ClusterSnapshot>>,
    stop: CancellationToken,
) {
    let prefix = config.workers_prefix();
    let mut backoff = Backoff::watcher();
    loop {
        let (client, cluster_id) = match connected.take() {
            Some(c) => c,
            None => {
                let listed = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = connect_and_list(&config) => r,
                };
                match listed {
                    Ok((client, listing)) => {
                        if listing.snapshot.revision < tx.borrow().revision {
                            tracing::warn!(
                                was = tx.borrow().revision,
                                now = listing.snapshot.revision,
                                "etcd revision went back (restored or replaced): using the new listing"
                            );
                        }
                        tx.send_replace(Arc::new(listing.snapshot));
                        backoff.reset();
                        (client, listing.cluster_id)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff.delay(), "registry list failed; keeping the last snapshot");
                        if !backoff.failed(&stop).await {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let mut client = client;
        let start = tx.borrow().revision + 1;
        tokio::select! {
            _ = stop.cancelled() => return,
            result = watch_from(&mut client, &prefix, start, cluster_id, &tx) => {
                match result {
                    Ok(()) => tracing::info!("registry watch ended; re-listing"),
                    Err(e) => tracing::warn!(error = %e, "registry watch failed; re-listing"),
                }
            }
        }
        if !backoff.pause(&stop).await {
            return;
        }
    }
}

/// Applies watch events to the published snapshot until the watch ends (compaction, cancel,
/// error, a header from another cluster or an older revision). Returns so the caller re-lists.
async fn watch_from(
    client: &mut Client,
    prefix: &str,
    start_revision: i64,
    cluster_id: u64,
    tx: &watch::Sender<Arc<ClusterSnapshot>>,
) -> Result<(), RegistryError> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start_revision)
        .with_progress_notify();
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
        if let Some(h) = resp.header() {
            let known = tx.borrow().revision;
            if h.cluster_id() != cluster_id || h.revision() < known {
                tracing::warn!(
                    cluster = h.cluster_id(),
                    revision = h.revision(),
                    known,
                    "etcd answered from another cluster or an older revision (restored?)"
                );
                return Ok(());
            }
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
