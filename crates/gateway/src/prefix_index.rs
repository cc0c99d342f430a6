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
use moe_common::prefix::BLOCK_TOKENS;
use moe_common::registry::ClusterSnapshot;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::router::RoutingState;
use crate::scheduler::features::has_prefix_cache_events;

/// The blocks one worker holds.
#[derive(Debug)]
struct Held {
    id: String,
    /// Index into [`Inner::fingerprints`].
    fingerprint: u32,
    blocks: HashSet<u64>,
}

/// A model fingerprint in use, with how many workers hold blocks under it.
#[derive(Debug)]
struct Fingerprint {
    name: String,
    workers: usize,
}

/// The index proper, behind [`PrefixIndex`]'s lock.
///
/// Two views of the same facts, kept in step by every change: each worker's blocks (by slot,
/// for diffs, removal and restarts) and, inverted, the workers holding each block of each model
/// file (for lookups, which then cost the prompt's blocks, not the workers).
#[derive(Debug, Default)]
struct Inner {
    /// Worker id → slot in `held`.
    slots: HashMap<String, u32>,
    /// By slot; `None` for a free slot.
    held: Vec<Option<Held>>,
    free: Vec<u32>,
    /// By index; `None` when no worker uses it any more.
    fingerprints: Vec<Option<Fingerprint>>,
    fingerprint_ids: HashMap<String, u32>,
    /// (fingerprint, block hash) → the slots of the workers holding it.
    holders: HashMap<(u32, u64), Vec<u32>>,
}

impl Inner {
    fn fingerprint_id(&mut self, name: String) -> u32 {
        if let Some(&id) = self.fingerprint_ids.get(&name) {
            if let Some(f) = self.fingerprints[id as usize].as_mut() {
                f.workers += 1;
            }
            return id;
        }
        let entry = Fingerprint {
            name: name.clone(),
            workers: 1,
        };
        let id = match self.fingerprints.iter().position(Option::is_none) {
            Some(i) => {
                self.fingerprints[i] = Some(entry);
                i as u32
            }
            None => {
                self.fingerprints.push(Some(entry));
                (self.fingerprints.len() - 1) as u32
            }
        };
        self.fingerprint_ids.insert(name, id);
        id
    }

    fn release_fingerprint(&mut self, id: u32) {
        let Some(slot) = self.fingerprints.get_mut(id as usize) else {
            return;
        };
        let done = slot.as_mut().is_some_and(|f| {
            f.workers = f.workers.saturating_sub(1);
            f.workers == 0
        });
        if done && let Some(f) = slot.take() {
            self.fingerprint_ids.remove(&f.name);
        }
    }

    fn add_holder(&mut self, fingerprint: u32, block: u64, slot: u32) {
        self.holders
            .entry((fingerprint, block))
            .or_default()
            .push(slot);
    }

    fn remove_holder(&mut self, fingerprint: u32, block: u64, slot: u32) {
        let key = (fingerprint, block);
        let Some(list) = self.holders.get_mut(&key) else {
            return;
        };
        if let Some(i) = list.iter().position(|&s| s == slot) {
            list.swap_remove(i);
        }
        if list.is_empty() {
            self.holders.remove(&key);
        }
    }

    /// Drops `worker`'s blocks from both views and frees its slot.
    fn forget(&mut self, worker: &str) {
        let Some(slot) = self.slots.remove(worker) else {
            return;
        };
        let Some(held) = self.held.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        for &b in &held.blocks {
            self.remove_holder(held.fingerprint, b, slot);
        }
        self.release_fingerprint(held.fingerprint);
        self.free.push(slot);
    }

    /// `worker` holds exactly `blocks` of model file `fingerprint` (a stream's snapshot).
    fn replace(&mut self, worker: &str, fingerprint: String, blocks: Vec<u64>) {
        self.forget(worker);
        let fingerprint = self.fingerprint_id(fingerprint);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.held.push(None);
                (self.held.len() - 1) as u32
            }
        };
        let blocks: HashSet<u64> = blocks.into_iter().collect();
        for &b in &blocks {
            self.add_holder(fingerprint, b, slot);
        }
        self.held[slot as usize] = Some(Held {
            id: worker.to_string(),
            fingerprint,
            blocks,
        });
        self.slots.insert(worker.to_string(), slot);
    }

    /// A diff of `worker`'s stream: `removed` dropped, then `stored` added.
    fn diff(&mut self, worker: &str, stored: Vec<u64>, removed: Vec<u64>) {
        let Some(&slot) = self.slots.get(worker) else {
            return;
        };
        let Some(held) = self.held.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let fingerprint = held.fingerprint;
        let gone: Vec<u64> = removed
            .into_iter()
            .filter(|h| held.blocks.remove(h))
            .collect();
        let new: Vec<u64> = stored
            .into_iter()
            .filter(|h| held.blocks.insert(*h))
            .collect();
        for b in gone {
            self.remove_holder(fingerprint, b, slot);
        }
        for b in new {
            self.add_holder(fingerprint, b, slot);
        }
    }
}

/// Block hashes held by each worker, by worker id, with the inverse (block → workers) that
/// [`PrefixIndex::hits`] reads.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    inner: RwLock<Inner>,
}

impl PrefixIndex {
    /// Applies one event of `worker`'s stream.
    pub fn apply(&self, worker: &str, event: PrefixCacheEvent) {
        let mut inner = self.inner.write().expect("prefix index lock");
        if event.block_tokens != BLOCK_TOKENS {
            // Another block size: its hashes never match ours.
            inner.forget(worker);
            return;
        }
        if event.snapshot {
            inner.replace(worker, event.model_fingerprint, event.stored);
            return;
        }
        // A diff without a snapshot before it (cannot happen on one stream) is ignored.
        inner.diff(worker, event.stored, event.removed);
    }

    /// Forgets `worker` (stream ended, worker left): it holds nothing until its next snapshot.
    pub fn forget(&self, worker: &str) {
        self.inner
            .write()
            .expect("prefix index lock")
            .forget(worker);
    }

    /// Blocks `worker` holds now (tests, debugging).
    pub fn held_blocks(&self, worker: &str) -> usize {
        let inner = self.inner.read().expect("prefix index lock");
        inner
            .slots
            .get(worker)
            .and_then(|&s| inner.held.get(s as usize))
            .and_then(Option::as_ref)
            .map_or(0, |h| h.blocks.len())
    }

    /// Prompt tokens each worker of model file `fingerprint` holds of a prompt of
    /// `prompt_tokens` tokens whose block hashes are `blocks` (whole leading blocks ×
    /// [`BLOCK_TOKENS`], at most the prompt); workers without a hit are left out.
    ///
    /// Reads the holders of the prompt's blocks in order, stopping at the first block that no
    /// worker holds after all the blocks before it: O(blocks + the holders of the blocks
    /// shared), whatever the number of workers holding none of the prompt.
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
        let inner = self.inner.read().expect("prefix index lock");
        let Some(&fp) = inner.fingerprint_ids.get(fingerprint) else {
            return out;
        };
        // Slot → leading blocks held so far; a slot whose run ended keeps its count.
        let mut run: HashMap<u32, u32> = HashMap::new();
        for (i, b) in blocks.iter().enumerate() {
            let Some(slots) = inner.holders.get(&(fp, *b)) else {
                break;
            };
            let i = i as u32;
            let mut going = false;
            for &s in slots {
                if i == 0 {
                    run.insert(s, 1);
                    going = true;
                } else if let Some(n) = run.get_mut(&s)
                    && *n == i
                {
                    *n += 1;
                    going = true;
                }
            }
            if !going {
                break;
            }
        }
        out.reserve(run.len());
        for (s, n) in run {
            if let Some(Some(held)) = inner.held.get(s as usize) {
                let tokens = n.saturating_mul(BLOCK_TOKENS).min(prompt_tokens);
                out.insert(held.id.clone(), tokens);
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

    fn event_fp(snapshot: bool, fp: &str, stored: &[u64], removed: &[u64]) -> PrefixCacheEvent {
        PrefixCacheEvent {
            model_fingerprint: fp.into(),
            ..event(snapshot, stored, removed)
        }
    }

    impl PrefixIndex {
        /// The inverted view is exactly the per-worker view inverted, and slots and
        /// fingerprints are accounted for.
        fn check(&self) {
            let inner = self.inner.read().unwrap();
            let mut expected: HashMap<(u32, u64), Vec<u32>> = HashMap::new();
            let mut users: HashMap<u32, usize> = HashMap::new();
            for (slot, held) in inner.held.iter().enumerate() {
                let Some(held) = held else {
                    assert!(inner.free.contains(&(slot as u32)), "slot {slot} lost");
                    continue;
                };
                assert_eq!(inner.slots.get(&held.id), Some(&(slot as u32)));
                *users.entry(held.fingerprint).or_default() += 1;
                for &b in &held.blocks {
                    expected
                        .entry((held.fingerprint, b))
                        .or_default()
                        .push(slot as u32);
                }
            }
            assert_eq!(inner.slots.len(), inner.held.iter().flatten().count());
            let mut actual = inner.holders.clone();
            for v in expected.values_mut().chain(actual.values_mut()) {
                v.sort_unstable();
            }
            assert_eq!(
                actual, expected,
                "holders out of step with the workers' blocks"
            );
            for (i, f) in inner.fingerprints.iter().enumerate() {
                let n = users.get(&(i as u32)).copied().unwrap_or(0);
                match f {
                    Some(f) => {
                        assert_eq!(f.workers, n, "fingerprint {} users", f.name);
                        assert_eq!(inner.fingerprint_ids.get(&f.name), Some(&(i as u32)));
                    }
                    None => assert_eq!(n, 0),
                }
            }
            assert_eq!(
                inner.fingerprint_ids.len(),
                inner.fingerprints.iter().flatten().count()
            );
        }
    }

    #[test]
    fn a_restarted_worker_stops_attracting_its_old_prefixes() {
        let index = PrefixIndex::default();
        index.apply("a", event(true, &[1, 2, 3], &[]));
        index.apply("b", event(true, &[1, 2], &[]));
        assert_eq!(index.hits("fp", &[1, 2, 3], 200).get("a"), Some(&96));
        // The stream ends (the worker restarts): nothing until its next snapshot.
        index.forget("a");
        index.check();
        assert_eq!(index.hits("fp", &[1, 2, 3], 200).get("a"), None);
        assert_eq!(index.hits("fp", &[1, 2, 3], 200).get("b"), Some(&64));
        // Back with an empty cache, then a new prefix: the old one does not come back.
        index.apply("a", event(true, &[], &[]));
        index.apply("a", event(false, &[7], &[]));
        index.check();
        assert_eq!(index.hits("fp", &[1, 2, 3], 200).get("a"), None);
        assert_eq!(index.hits("fp", &[7], 200).get("a"), Some(&32));
        // A snapshot of a restarted stream replaces everything without a forget first.
        index.apply("b", event(true, &[9], &[]));
        index.check();
        assert!(index.hits("fp", &[1], 200).is_empty());
        assert_eq!(index.held_blocks("b"), 1);
        // Another block size: forgotten.
        index.apply(
            "b",
            PrefixCacheEvent {
                block_tokens: BLOCK_TOKENS * 2,
                ..event(true, &[9], &[])
            },
        );
        index.check();
        assert!(index.hits("fp", &[9], 200).is_empty());
        assert_eq!(index.held_blocks("b"), 0);
        index.forget("a");
        index.check();
        let inner = index.inner.read().unwrap();
        assert!(inner.holders.is_empty() && inner.fingerprint_ids.is_empty());
    }

    #[test]
    fn one_workers_change_leaves_the_others_blocks_alone() {
        let index = PrefixIndex::default();
        index.apply("a", event(true, &[1, 2], &[]));
        index.apply("b", event(true, &[1, 2], &[]));
        index.apply("c", event_fp(true, "other", &[1, 2], &[]));
        index.apply("a", event(false, &[], &[2]));
        index.check();
        let hits = index.hits("fp", &[1, 2], 100);
        assert_eq!((hits.get("a"), hits.get("b")), (Some(&32), Some(&64)));
        assert_eq!(hits.get("c"), None, "another model file");
        assert_eq!(index.hits("other", &[1, 2], 100).get("c"), Some(&64));
        // Removing a block it does not hold, or storing one it holds, changes nothing.
        index.apply("b", event(false, &[1], &[5]));
        index.check();
        assert_eq!(index.hits("fp", &[1, 2], 100).get("b"), Some(&64));
        // A worker holding a later block but not an earlier one has no run past the miss.
        index.apply("d", event(true, &[2, 3], &[]));
        assert_eq!(index.hits("fp", &[1, 2, 3], 100).get("d"), None);
        index.check();
    }

    #[test]
    fn hits_match_a_scan_of_every_worker_through_random_changes() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(17);
        let index = PrefixIndex::default();
        // The model: worker → (fingerprint, blocks), what the old scan read.
        let mut model: HashMap<String, (String, HashSet<u64>)> = HashMap::new();
        let ids: Vec<String> = (0..12).map(|i| format!("w{i}")).collect();
        let fps = ["fp", "other"];
        for round in 0..3000 {
            let id = &ids[rng.random_range(0..ids.len())];
            let some = |rng: &mut StdRng| -> Vec<u64> {
                (0..rng.random_range(0..6))
                    .map(|_| rng.random_range(0..10))
                    .collect()
            };
            match rng.random_range(0..10) {
                0 => {
                    index.forget(id);
                    model.remove(id);
                }
                1 | 2 => {
                    let fp = fps[rng.random_range(0..2)];
                    let stored = some(&mut rng);
                    index.apply(id, event_fp(true, fp, &stored, &[]));
                    model.insert(id.clone(), (fp.into(), stored.into_iter().collect()));
                }
                _ => {
                    let (stored, removed) = (some(&mut rng), some(&mut rng));
                    let fp = model.get(id).map_or("fp".into(), |m| m.0.clone());
                    index.apply(id, event_fp(false, &fp, &stored, &removed));
                    if let Some((_, blocks)) = model.get_mut(id) {
                        for h in &removed {
                            blocks.remove(h);
                        }
                        blocks.extend(stored);
                    }
                }
            }
            if round % 50 == 0 {
                index.check();
            }
            let prompt: Vec<u64> = (0..rng.random_range(1..6))
                .map(|_| rng.random_range(0..10))
                .collect();
            let fp = fps[rng.random_range(0..2)];
            let expected: HashMap<String, u32> = model
                .iter()
                .filter(|(_, (f, _))| f == fp)
                .filter_map(|(id, (_, blocks))| {
                    let n = prompt.iter().take_while(|b| blocks.contains(b)).count() as u32;
                    (n > 0).then(|| (id.clone(), (n * BLOCK_TOKENS).min(100)))
                })
                .collect();
            assert_eq!(index.hits(fp, &prompt, 100), expected, "round {round}");
        }
        index.check();
    }
}
