//! The gateway's view of every worker's prefix cache (issue 17): for each worker in the
//! registry, a subscription to its `moe.v1.Worker/WatchPrefixCache` stream keeps the set of
//! block hashes its KV cache holds and its model fingerprint.
//!
//! - A subscription starts when a worker that advertises `prefix_cache_events` appears in the
//!   registry snapshot, stops when it leaves (or its endpoint changes, or it stops advertising
//!   the feature), and reconnects with backoff (100 ms doubling to 5 s) when
//!   the stream ends; until the next snapshot arrives the worker counts as holding nothing, so a
//!   restarted worker (cache lost) no longer attracts its old prefixes.
//! - Workers without the feature (older versions: no `WatchPrefixCache` RPC) get no
//!   subscription and count as holding nothing.
//! - A snapshot message replaces a worker's set; later messages add `stored` and drop `removed`.
//! - Every gateway subscribes to the same streams, so gateways see the same cache and make the
//!   same choices without talking to each other.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use moe_common::pb::v1::worker_client::WorkerClient;
use moe_common::pb::{PrefixCacheEvent, WatchPrefixCacheRequest};
use moe_common::prefix::{BLOCK_TOKENS, cached_blocks};
use moe_common::registry::ClusterSnapshot;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::router::RoutingState;
use crate::scheduler::features::has_prefix_cache_events;

/// The blocks one worker holds.
#[derive(Debug, Default)]
struct Held {
    fingerprint: String,
    blocks: HashSet<u64>,
}

/// Block hashes held by each worker, by worker id.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    workers: RwLock<HashMap<String, Held>>,
}

impl PrefixIndex {
    /// Applies one event of `worker`'s stream.
    pub fn apply(&self, worker: &str, event: PrefixCacheEvent) {
        let mut workers = self.workers.write().expect("prefix index lock");
        if event.block_tokens != BLOCK_TOKENS {
            // Another block size: its hashes never match ours.
            workers.remove(worker);
            return;
        }
        if event.snapshot {
            workers.insert(
                worker.to_string(),
                Held {
                    fingerprint: event.model_fingerprint,
                    blocks: event.stored.into_iter().collect(),
                },
            );
            return;
        }
        // A diff without a snapshot before it (cannot happen on one stream) is ignored.
        if let Some(held) = workers.get_mut(worker) {
            for h in event.removed {
                held.blocks.remove(&h);
            }
            held.blocks.extend(event.stored);
        }
    }

    /// Forgets `worker` (stream ended, worker left): it holds nothing until its next snapshot.
    pub fn forget(&self, worker: &str) {
        self.workers
            .write()
            .expect("prefix index lock")
            .remove(worker);
    }

    /// Blocks `worker` holds now (tests, debugging).
    pub fn held_blocks(&self, worker: &str) -> usize {
        self.workers
            .read()
            .expect("prefix index lock")
            .get(worker)
            .map_or(0, |h| h.blocks.len())
    }

    /// Prompt tokens each worker of model file `fingerprint` holds of a prompt of
    /// `prompt_tokens` tokens whose block hashes are `blocks` (whole leading blocks ×
    /// [`BLOCK_TOKENS`], at most the prompt); workers without a hit are left out.
    pub fn hits(
        &self,
        fingerprint: &str,
        blocks: &[u64],
        prompt_tokens: u32,
    ) -> HashMap<String, u32> {
        let mut out = HashMap::new();
        if blocks.is_empty() {
            return out;
        }
        let workers = self.workers.read().expect("prefix index lock");
        for (id, held) in workers.iter() {
            if held.fingerprint != fingerprint {
                continue;
            }
            let n = cached_blocks(blocks, |h| held.blocks.contains(&h));
            if n > 0 {
                let tokens = (n as u32).saturating_mul(BLOCK_TOKENS).min(prompt_tokens);
                out.insert(id.clone(), tokens);
            }
        }
        out
    }
}

/// Keeps one subscription per worker of the registry, until `stop`.
pub fn spawn(
    index: Arc<PrefixIndex>,
    router: Arc<RoutingState>,
    mut snapshots: watch::Receiver<Arc<ClusterSnapshot>>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut subscriptions: HashMap<String, (String, JoinHandle<()>)> = HashMap::new();
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            let wanted = followed(&snapshot);
            subscriptions.retain(|id, (endpoint, task)| {
                let keep = wanted.get(id.as_str()) == Some(&endpoint.as_str());
                if !keep {
                    task.abort();
                    index.forget(id);
                }
                keep
            });
            for (id, endpoint) in wanted {
                if subscriptions.contains_key(id) {
                    continue;
                }
                let task = tokio::spawn(follow(
                    index.clone(),
                    router.clone(),
                    id.to_string(),
                    endpoint.to_string(),
                ));
                subscriptions.insert(id.to_string(), (endpoint.to_string(), task));
            }
            tokio::select! {
                () = stop.cancelled() => break,
                r = snapshots.changed() => if r.is_err() { break },
            }
        }
        for (id, (_, task)) in subscriptions {
            task.abort();
            index.forget(&id);
        }
    });
}

/// The workers of `snapshot` to subscribe to, id → endpoint: those that advertise
/// `prefix_cache_events` (older workers have no `WatchPrefixCache` RPC).
fn followed(snapshot: &ClusterSnapshot) -> HashMap<&str, &str> {
    snapshot
        .workers
        .values()
        .filter(|w| has_prefix_cache_events(w))
        .map(|w| (w.id.as_str(), w.endpoint.as_str()))
        .collect()
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One worker's subscription: stream, apply, and on any end forget and reconnect.
async fn follow(index: Arc<PrefixIndex>, router: Arc<RoutingState>, id: String, endpoint: String) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match router.channel(&endpoint) {
            Err(e) => tracing::debug!(worker = %id, error = %e, "prefix cache: cannot dial"),
            Ok(channel) => {
                let mut client = WorkerClient::new(channel);
                match client.watch_prefix_cache(WatchPrefixCacheRequest {}).await {
                    Err(e) => {
                        tracing::debug!(worker = %id, code = ?e.code(), error = e.message(), "prefix cache: subscribe failed");
                        if e.code() == tonic::Code::Unimplemented {
                            // An older worker: check again now and then.
                            backoff = BACKOFF_MAX;
                        }
                    }
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(event)) => {
                                    if event.snapshot {
                                        backoff = BACKOFF_MIN;
                                    }
                                    index.apply(&id, event);
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::debug!(worker = %id, code = ?e.code(), "prefix cache stream ended");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
        }
        index.forget(&id);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(snapshot: bool, stored: &[u64], removed: &[u64]) -> PrefixCacheEvent {
        PrefixCacheEvent {
            snapshot,
            stored: stored.to_vec(),
            removed: removed.to_vec(),
            block_tokens: BLOCK_TOKENS,
            model_fingerprint: "fp".into(),
        }
    }

    #[test]
    fn only_workers_advertising_prefix_cache_events_are_followed() {
        use moe_common::registry::{Feature, Features, WorkerAdvert};
        let advert = |id: &str, features: Features| {
            let json = format!(
                r#"{{"schema":1,"id":"{id}","endpoint":"http://127.0.0.1:5006{}","state":"ready",
                "model":{{"name":"m","architecture":"llama","n_layer":1,"expert_count":0,
                "expert_used_count":0,"weight_bytes":1}},
                "offload":{{"mode":"full","n_cpu_moe":0,"profile":"full"}},
                "devices":[],"memory":{{"weight_bytes":1,"kv_bytes":1,"host_expert_bytes":0}},
                "capacity":{{"context_tokens":100,"free_kv_tokens":100,"max_sequences":1}},
                "load":{{"active":0,"queued":0}},"version":"t","updated_unix_ms":1}}"#,
                id.len()
            );
            let mut w = WorkerAdvert::from_json(&format!("/w/{id}"), json.as_bytes()).unwrap();
            w.features = features;
            (id.to_string(), Arc::new(w))
        };
        let old = Features::all()
            .iter()
            .filter(|f| *f != Feature::PrefixCacheEvents)
            .collect();
        let snapshot = ClusterSnapshot {
            revision: 1,
            workers: [
                advert("new", Features::all()),
                advert("older", old),
                advert("oldest", Features::NONE),
            ]
            .into_iter()
            .collect(),
            rejected: Default::default(),
        };
        let wanted = followed(&snapshot);
        assert_eq!(wanted.keys().copied().collect::<Vec<_>>(), ["new"]);
        assert_eq!(wanted["new"], "http://127.0.0.1:50063");
    }

    #[test]
    fn snapshots_replace_diffs_apply_and_hits_stop_at_the_first_miss() {
        let index = PrefixIndex::default();
        index.apply("a", event(true, &[1, 2, 3], &[]));
        index.apply("b", event(true, &[1], &[]));
        index.apply("a", event(false, &[4], &[3]));
        let hits = index.hits("fp", &[1, 2, 4], 100);
        assert_eq!(hits.get("a"), Some(&96), "1, 2 and 4 held: three blocks");
        assert_eq!(hits.get("b"), Some(&32));
        assert_eq!(
            index.hits("fp", &[1, 2, 4], 40).get("a"),
            Some(&40),
            "at most the prompt"
        );
        assert!(
            index.hits("other", &[1], 100).is_empty(),
            "another model file"
        );
        index.apply("a", event(true, &[], &[]));
        assert_eq!(
            index.hits("fp", &[1], 100).get("a"),
            None,
            "a new snapshot replaces"
        );
        index.forget("b");
        assert!(index.hits("fp", &[1], 100).is_empty());
    }
}
