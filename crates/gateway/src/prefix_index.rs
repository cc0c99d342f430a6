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
use crate::scheduler::PrefixHits;
use crate::scheduler::affinity::{rendezvous_weight, stable_hash};
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
    holders: HashMap<(u32, u64), Holders>,
}

/// The workers holding one block: their slots in ascending order, and for a block held by
/// many workers the same as a bitset by slot, so that whether one worker holds it
/// ([`SharedPrefix::cached`]) is one bit, not a binary search of thousands of slots.
#[derive(Clone, Debug, Default, PartialEq)]
struct Holders {
    slots: Vec<u32>,
    /// Empty unless the block has at least [`BITSET_MIN`] holders and one per 32 slots in use
    /// (so the bitset is no larger than the list); dropped below half of that.
    bits: Vec<u64>,
}

/// Holders of a block from which it also keeps a bitset.
const BITSET_MIN: usize = 64;

impl Holders {
    fn holds(&self, slot: u32) -> bool {
        if self.bits.is_empty() {
            return self.slots.binary_search(&slot).is_ok();
        }
        self.bits
            .get(slot as usize / 64)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    fn set_bit(&mut self, slot: u32, on: bool) {
        let (word, bit) = (slot as usize / 64, 1u64 << (slot % 64));
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if on {
            self.bits[word] |= bit;
        } else {
            self.bits[word] &= !bit;
        }
    }

    /// Adds `slot`; `slots_in_use`: the index's slots, for the bitset's size rule.
    fn add(&mut self, slot: u32, slots_in_use: usize) {
        let Err(i) = self.slots.binary_search(&slot) else {
            return;
        };
        self.slots.insert(i, slot);
        if !self.bits.is_empty() {
            self.set_bit(slot, true);
        } else if self.slots.len() >= BITSET_MIN && self.slots.len() * 32 >= slots_in_use {
            for s in self.slots.clone() {
                self.set_bit(s, true);
            }
        }
    }

    fn remove(&mut self, slot: u32, slots_in_use: usize) {
        let Ok(i) = self.slots.binary_search(&slot) else {
            return;
        };
        self.slots.remove(i);
        if !self.bits.is_empty() {
            if self.slots.len() * 2 < BITSET_MIN || self.slots.len() * 64 < slots_in_use {
                self.bits = Vec::new();
            } else {
                self.set_bit(slot, false);
            }
        }
    }
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
        let in_use = self.held.len();
        self.holders
            .entry((fingerprint, block))
            .or_default()
            .add(slot, in_use);
    }

    fn remove_holder(&mut self, fingerprint: u32, block: u64, slot: u32) {
        let key = (fingerprint, block);
        let Some(list) = self.holders.get_mut(&key) else {
            return;
        };
        list.remove(slot, self.held.len());
        if list.slots.is_empty() {
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

/// Workers listed by [`PrefixIndex::hits`] at most (those holding more of a prompt than the
/// run of blocks (nearly) every worker holds). 32: a conversation is held by one to a few
/// workers; a prefix held by more than 32 but at most half of the workers lists its 32 longest.
pub const LIST_BOUND: usize = 32;

/// Block hashes held by each worker, by worker id, with the inverse (block → workers) that
/// [`PrefixIndex::hits`] reads.
#[derive(Debug)]
pub struct PrefixIndex {
    inner: Arc<RwLock<Inner>>,
    /// Workers [`PrefixIndex::hits`] lists at most ([`LIST_BOUND`]).
    list_bound: usize,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        PrefixIndex::with_list_bound(LIST_BOUND)
    }
}

impl PrefixIndex {
    /// An empty index whose [`PrefixIndex::hits`] lists at most `bound` workers (at least 1).
    pub fn with_list_bound(bound: usize) -> Self {
        PrefixIndex {
            inner: Arc::default(),
            list_bound: bound.max(1),
        }
    }

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

    /// The prompt tokens the workers of model file `fingerprint` hold of a prompt of
    /// `prompt_tokens` tokens whose block hashes are `blocks` (whole leading blocks ×
    /// [`BLOCK_TOKENS`], at most the prompt), for the request with prefix key `key`.
    ///
    /// - The *shared run*: the leading blocks each held by more than half of the model file's
    ///   workers and by more than the list bound ([`LIST_BOUND`]); a system prompt every worker
    ///   holds, say. It does not tell workers apart, so its holders are not listed: what a worker
    ///   not listed holds is read from the index when it is scored ([`SharedPrefix::cached`],
    ///   exact: a worker that lacks part of the shared run, such as a restarted one, or serves
    ///   another model file, counts what it holds).
    /// - Listed (`cached_tokens`): the workers holding more than the shared run (every one of
    ///   them holds the block after it), with what they hold; at most the bound of them: the
    ///   longest runs, ties to the highest rendezvous weight of `key` (the ranking's own
    ///   tie-break), then the smaller id: the same on every gateway with the same events. A
    ///   worker left out by the bound still counts what it holds when sampling draws it.
    ///
    /// Cost: one probe per block of the shared run, plus the holders of the block after it (at
    /// most the bound, unless it is held by more than the bound but at most half of the
    /// workers) times the prompt's blocks: not the number of workers holding the shared run.
    pub fn hits(
        &self,
        fingerprint: &str,
        blocks: &[u64],
        prompt_tokens: u32,
        key: Option<u64>,
    ) -> PrefixHits {
        let mut out = PrefixHits {
            key,
            ..PrefixHits::default()
        };
        if blocks.is_empty() {
            return out;
        }
        let inner = self.inner.read().expect("prefix index lock");
        let Some(&fp) = inner.fingerprint_ids.get(fingerprint) else {
            return out;
        };
        let members = inner
            .fingerprints
            .get(fp as usize)
            .and_then(Option::as_ref)
            .map_or(0, |f| f.workers);
        let bound = self.list_bound;
        let holders = |b: u64| {
            inner
                .holders
                .get(&(fp, b))
                .map_or(&[][..], |h| h.slots.as_slice())
        };
        let dense = |n: usize| n > bound && n * 2 > members;
        let mut shared = 0;
        while shared < blocks.len() && dense(holders(blocks[shared]).len()) {
            shared += 1;
        }
        // Workers holding more than the shared run: holders of the block after it that hold
        // every block before it, with their leading run.
        let mut beyond: Vec<(u32, &str)> = Vec::new();
        if let Some(&next) = blocks.get(shared) {
            for &slot in holders(next) {
                let Some(Some(held)) = inner.held.get(slot as usize) else {
                    continue;
                };
                if !blocks[..shared].iter().all(|b| held.blocks.contains(b)) {
                    continue;
                }
                let more = blocks[shared + 1..]
                    .iter()
                    .take_while(|b| held.blocks.contains(b))
                    .count();
                beyond.push(((shared + 1 + more) as u32, held.id.as_str()));
            }
        }
        let capped = beyond.len() > bound;
        if capped {
            let weight = |id: &str| rendezvous_weight(key.unwrap_or(0), stable_hash(id.as_bytes()));
            let mut ranked: Vec<(u32, u64, &str)> = beyond
                .into_iter()
                .map(|(run, id)| (run, weight(id), id))
                .collect();
            ranked.select_nth_unstable_by(bound - 1, |a, b| {
                b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then_with(|| a.2.cmp(b.2))
            });
            ranked.truncate(bound);
            beyond = ranked.into_iter().map(|(run, _, id)| (run, id)).collect();
        }
        let tokens = |run: u32| run.saturating_mul(BLOCK_TOKENS).min(prompt_tokens);
        out.cached_tokens = beyond
            .into_iter()
            .map(|(run, id)| (id.to_string(), tokens(run)))
            .collect();
        if shared > 0 || capped {
            out.shared = Some(SharedPrefix {
                inner: self.inner.clone(),
                fingerprint: fingerprint.into(),
                fingerprint_id: fp,
                blocks: blocks.into(),
                prompt_tokens,
                shared_tokens: tokens(shared as u32),
            });
        }
        out
    }
}

/// What the workers [`PrefixIndex::hits`] did not list hold of a prompt, read from the index
/// when a worker is scored: a worker's leading run of the prompt's blocks as the index holds it
/// then (exact, like a listed worker's): its slot, then one bit of each block's holders (a
/// bitset for a block held by many; the shared run's are read by every request, so they stay
/// in cache), until a block it lacks.
#[derive(Clone)]
pub struct SharedPrefix {
    inner: Arc<RwLock<Inner>>,
    fingerprint: Arc<str>,
    /// `fingerprint`'s index when looked up (checked by name: an index is reused once no worker
    /// holds blocks of its model file).
    fingerprint_id: u32,
    blocks: Arc<[u64]>,
    prompt_tokens: u32,
    shared_tokens: u32,
}

impl std::fmt::Debug for SharedPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPrefix")
            .field("fingerprint", &self.fingerprint)
            .field("blocks", &self.blocks.len())
            .field("prompt_tokens", &self.prompt_tokens)
            .field("shared_tokens", &self.shared_tokens)
            .finish_non_exhaustive()
    }
}

impl SharedPrefix {
    /// Prompt tokens `worker` holds (0 when it holds none, or serves another model file).
    pub fn cached(&self, worker: &str) -> u32 {
        let inner = self.inner.read().expect("prefix index lock");
        let fp = self.fingerprint_id;
        let same_file = inner
            .fingerprints
            .get(fp as usize)
            .and_then(Option::as_ref)
            .is_some_and(|f| *f.name == *self.fingerprint);
        let fp = match (same_file, inner.fingerprint_ids.get(&*self.fingerprint)) {
            (true, _) => fp,
            (false, Some(&fp)) => fp,
            (false, None) => return 0,
        };
        let Some(&slot) = inner.slots.get(worker) else {
            return 0;
        };
        // The holders are listed by model file: a worker of another one holds none of them.
        let run = self
            .blocks
            .iter()
            .take_while(|&&b| inner.holders.get(&(fp, b)).is_some_and(|h| h.holds(slot)))
            .count() as u32;
        run.saturating_mul(BLOCK_TOKENS).min(self.prompt_tokens)
    }

    /// The tokens of the shared run: the leading blocks each held by more than half of the
    /// workers (and more than the list bound) when the hits were looked up.
    pub fn shared_tokens(&self) -> u32 {
        self.shared_tokens
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
        let hits = index.hits("fp", &[1, 2, 4], 100, None);
        assert_eq!(hits.cached("a"), 96, "1, 2 and 4 held: three blocks");
        assert_eq!(hits.cached("b"), 32);
        assert_eq!(
            index.hits("fp", &[1, 2, 4], 40, None).cached("a"),
            40,
            "at most the prompt"
        );
        assert!(
            index.hits("other", &[1], 100, None).is_empty(),
            "another model file"
        );
        index.apply("a", event(true, &[], &[]));
        assert_eq!(
            index.hits("fp", &[1], 100, None).cached("a"),
            0,
            "a new snapshot replaces"
        );
        index.forget("b");
        assert!(index.hits("fp", &[1], 100, None).is_empty());
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
            for h in inner.holders.values() {
                assert!(
                    h.slots.windows(2).all(|w| w[0] < w[1]),
                    "holders not in order"
                );
                if !h.bits.is_empty() {
                    for slot in 0..h.bits.len() as u32 * 64 {
                        let listed = h.slots.binary_search(&slot).is_ok();
                        assert_eq!(h.holds(slot), listed, "bitset out of step at {slot}");
                    }
                }
            }
            let mut actual: HashMap<(u32, u64), Vec<u32>> = inner
                .holders
                .iter()
                .map(|(k, h)| (*k, h.slots.clone()))
                .collect();
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
        assert_eq!(index.hits("fp", &[1, 2, 3], 200, None).cached("a"), 96);
        // The stream ends (the worker restarts): nothing until its next snapshot.
        index.forget("a");
        index.check();
        assert_eq!(index.hits("fp", &[1, 2, 3], 200, None).cached("a"), 0);
        assert_eq!(index.hits("fp", &[1, 2, 3], 200, None).cached("b"), 64);
        // Back with an empty cache, then a new prefix: the old one does not come back.
        index.apply("a", event(true, &[], &[]));
        index.apply("a", event(false, &[7], &[]));
        index.check();
        assert_eq!(index.hits("fp", &[1, 2, 3], 200, None).cached("a"), 0);
        assert_eq!(index.hits("fp", &[7], 200, None).cached("a"), 32);
        // A snapshot of a restarted stream replaces everything without a forget first.
        index.apply("b", event(true, &[9], &[]));
        index.check();
        assert!(index.hits("fp", &[1], 200, None).is_empty());
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
        assert!(index.hits("fp", &[9], 200, None).is_empty());
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
        let hits = index.hits("fp", &[1, 2], 100, None);
        assert_eq!((hits.cached("a"), hits.cached("b")), (32, 64));
        assert_eq!(hits.cached("c"), 0, "another model file");
        assert_eq!(index.hits("other", &[1, 2], 100, None).cached("c"), 64);
        // Removing a block it does not hold, or storing one it holds, changes nothing.
        index.apply("b", event(false, &[1], &[5]));
        index.check();
        assert_eq!(index.hits("fp", &[1, 2], 100, None).cached("b"), 64);
        // A worker holding a later block but not an earlier one has no run past the miss.
        index.apply("d", event(true, &[2, 3], &[]));
        assert_eq!(index.hits("fp", &[1, 2, 3], 100, None).cached("d"), 0);
        index.check();
    }

    /// `hits` checked against `expected` (every worker's prompt tokens, the old scan of every
    /// worker): each worker's cached tokens exact; with at most `bound` workers listed, each
    /// holding more than the shared run; unlisted workers holding more only when the list is
    /// full, and then no longer than any listed one (ties by the key's rendezvous weight).
    fn check_hits(hits: &PrefixHits, expected: &HashMap<String, u32>, bound: usize, what: &str) {
        let shared = hits.shared.as_ref().map_or(0, SharedPrefix::shared_tokens);
        for (id, &tokens) in expected {
            assert_eq!(hits.cached(id), tokens, "{what}: {id}");
        }
        for (id, &tokens) in &hits.cached_tokens {
            assert_eq!(expected.get(id), Some(&tokens), "{what}: listed {id}");
            assert!(
                tokens > shared,
                "{what}: {id} listed with the shared run only"
            );
        }
        assert!(
            hits.cached_tokens.len() <= bound,
            "{what}: more than {bound} listed"
        );
        let weight =
            |id: &str| rendezvous_weight(hits.key.unwrap_or(0), stable_hash(id.as_bytes()));
        let last = hits
            .cached_tokens
            .iter()
            .map(|(id, &t)| (t, weight(id), std::cmp::Reverse(id.clone())))
            .min();
        for (id, &tokens) in expected {
            if tokens > shared && !hits.cached_tokens.contains_key(id) {
                assert!(
                    hits.shared.is_some(),
                    "{what}: {id} neither listed nor shared"
                );
                assert_eq!(hits.cached_tokens.len(), bound, "{what}: {id} left out");
                let this = (tokens, weight(id), std::cmp::Reverse(id.clone()));
                assert!(Some(this) < last, "{what}: {id} left out for a shorter run");
            }
        }
        if hits.shared.is_none() {
            let with_hit = expected.values().filter(|&&t| t > 0).count();
            assert_eq!(
                hits.cached_tokens.len(),
                with_hit,
                "{what}: every hit listed"
            );
        }
    }

    #[test]
    fn hits_match_a_scan_of_every_worker_through_random_changes() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        // The default bound lists every hit of 12 workers; bounds of 1 and 3 make the blocks
        // most workers hold a shared run and cut the list.
        for bound in [LIST_BOUND, 3, 1] {
            let mut rng = StdRng::seed_from_u64(17 + bound as u64);
            let index = PrefixIndex::with_list_bound(bound);
            // The model: worker → (fingerprint, blocks), what the old scan read.
            let mut model: HashMap<String, (String, HashSet<u64>)> = HashMap::new();
            let ids: Vec<String> = (0..12).map(|i| format!("w{i}")).collect();
            let fps = ["fp", "other"];
            let mut shared_runs = 0;
            let mut cut = 0;
            for round in 0..3000 {
                let id = &ids[rng.random_range(0..ids.len())];
                // Blocks 0..3 are held by most workers (a system prompt), 3..10 less often.
                let some = |rng: &mut StdRng| -> Vec<u64> {
                    let mut v: Vec<u64> = (0..rng.random_range(0..6))
                        .map(|_| rng.random_range(0..10))
                        .collect();
                    if rng.random_bool(0.6) {
                        v.extend(0..3);
                    }
                    v
                };
                match rng.random_range(0..10) {
                    0 => {
                        index.forget(id);
                        model.remove(id);
                    }
                    1 | 2 => {
                        let fp = fps[usize::from(rng.random_bool(0.2))];
                        let stored = some(&mut rng);
                        index.apply(id, event_fp(true, fp, &stored, &[]));
                        model.insert(id.clone(), (fp.into(), stored.into_iter().collect()));
                    }
                    _ => {
                        let stored = some(&mut rng);
                        let removed: Vec<u64> = (0..rng.random_range(0..3))
                            .map(|_| rng.random_range(0..10))
                            .collect();
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
                let mut prompt: Vec<u64> = if rng.random_bool(0.5) {
                    vec![0, 1, 2]
                } else {
                    vec![]
                };
                prompt.extend((0..rng.random_range(1..6)).map(|_| rng.random_range(0..10)));
                let fp = fps[usize::from(rng.random_bool(0.2))];
                let tokens = 1000;
                let expected: HashMap<String, u32> = ids
                    .iter()
                    .map(|id| {
                        let n = model
                            .get(id)
                            .filter(|(f, _)| f == fp)
                            .map_or(0, |(_, blocks)| {
                                prompt.iter().take_while(|b| blocks.contains(b)).count() as u32
                            });
                        (id.clone(), (n * BLOCK_TOKENS).min(tokens))
                    })
                    .collect();
                let key = rng.random_bool(0.5).then(|| rng.random());
                let hits = index.hits(fp, &prompt, tokens, key);
                check_hits(
                    &hits,
                    &expected,
                    bound,
                    &format!("bound {bound} round {round}"),
                );
                if let Some(s) = &hits.shared {
                    shared_runs += usize::from(s.shared_tokens() > 0);
                    cut += usize::from(hits.cached_tokens.len() == bound);
                }
                if bound == LIST_BOUND {
                    let listed: HashMap<String, u32> =
                        expected.into_iter().filter(|(_, t)| *t > 0).collect();
                    assert_eq!(
                        hits.cached_tokens, listed,
                        "round {round}: every hit listed"
                    );
                }
            }
            index.check();
            if bound < 12 {
                assert!(shared_runs > 100 && cut > 100, "{shared_runs} {cut}");
            }
        }
    }

    /// `n` workers holding a 4-block system prompt (blocks 100..104), and a conversation after
    /// it (blocks 0..) of the given lengths on the first workers.
    fn shared_system_prompt(n: usize, bound: usize, conversations: &[u64]) -> PrefixIndex {
        let index = PrefixIndex::with_list_bound(bound);
        for i in 0..n {
            let mut blocks: Vec<u64> = (100..104).collect();
            blocks.extend(0..conversations.get(i).copied().unwrap_or(0));
            // Another conversation of its own.
            blocks.extend([1000 + i as u64]);
            index.apply(&format!("w{i:03}"), event(true, &blocks, &[]));
        }
        index
    }

    fn system_prompt_and(conversation: u64) -> Vec<u64> {
        (100..104).chain(0..conversation).collect()
    }

    #[test]
    fn a_system_prompt_every_worker_holds_is_shared_not_listed() {
        let index = shared_system_prompt(100, 8, &[6, 0, 3]);
        let hits = index.hits("fp", &system_prompt_and(6), 400, Some(1));
        let shared = hits.shared.as_ref().expect("a shared run");
        assert_eq!(shared.shared_tokens(), 4 * 32, "the system prompt");
        let listed: Vec<(&str, u32)> = {
            let mut v: Vec<_> = hits
                .cached_tokens
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            listed,
            [("w000", 320), ("w002", 224)],
            "only the conversation's holders"
        );
        assert_eq!(
            hits.cached("w001"),
            128,
            "the others hold the system prompt"
        );
        assert_eq!(hits.cached("w099"), 128);
        assert_eq!(hits.cached("nobody"), 0);
        // The prompt is the system prompt alone: nobody is listed, everybody holds all of it.
        let hits = index.hits("fp", &system_prompt_and(0), 128, None);
        assert!(hits.cached_tokens.is_empty());
        assert_eq!(hits.cached("w050"), 128);
        // Another model file holds nothing of it.
        index.apply(
            "q8",
            event_fp(true, "fp+kv-q8_0-q8_0", &[100, 101, 102, 103], &[]),
        );
        let hits = index.hits("fp", &system_prompt_and(6), 400, None);
        assert_eq!(hits.cached("q8"), 0);
        // Held by at most half the workers: not a shared run, every holder listed (bound 8).
        let index = shared_system_prompt(100, 8, &[]);
        for i in 50..100 {
            index.apply(&format!("w{i:03}"), event(true, &[1000 + i], &[]));
        }
        let hits = index.hits("fp", &system_prompt_and(0), 128, Some(1));
        assert_eq!(
            hits.shared.as_ref().map(SharedPrefix::shared_tokens),
            Some(0)
        );
        assert_eq!(hits.cached_tokens.len(), 8, "the bound");
        assert_eq!(
            hits.cached("w010"),
            128,
            "an unlisted holder, drawn, counts its hit"
        );
        assert_eq!(hits.cached("w060"), 0);
        index.check();
    }

    #[test]
    fn a_restarted_worker_does_not_count_the_shared_run() {
        let index = shared_system_prompt(50, 4, &[5]);
        let prompt = system_prompt_and(5);
        assert_eq!(index.hits("fp", &prompt, 500, None).cached("w000"), 9 * 32);
        // w000 and w001 restart: forgotten, then back with an empty cache.
        index.forget("w000");
        index.forget("w001");
        index.apply("w001", event(true, &[], &[]));
        let hits = index.hits("fp", &prompt, 500, None);
        assert_eq!(
            hits.shared.as_ref().map(SharedPrefix::shared_tokens),
            Some(128)
        );
        assert!(
            hits.cached_tokens.is_empty(),
            "nobody holds the conversation now"
        );
        assert_eq!((hits.cached("w000"), hits.cached("w001")), (0, 0));
        assert_eq!(hits.cached("w002"), 128);
        // Read when scored: w001 storing the system prompt counts at once.
        index.apply("w001", event(false, &[100, 101], &[]));
        assert_eq!(hits.cached("w001"), 64);
        // A worker that lost the middle of the shared run holds only its start.
        index.apply("w003", event(false, &[], &[102]));
        assert_eq!(index.hits("fp", &prompt, 500, None).cached("w003"), 64);
        index.check();
    }

    #[test]
    fn a_cut_list_keeps_the_longest_runs_the_same_way_on_every_gateway() {
        // 40 workers hold the system prompt; 12 hold conversation blocks 0..k for k = 1..=12;
        // a bound of 5 lists the five longest (w011..w007), whatever the order events came in.
        let conversations: Vec<u64> = (1..=12).collect();
        let a = shared_system_prompt(40, 5, &conversations);
        let b = PrefixIndex::with_list_bound(5);
        for i in (0..40).rev() {
            let mut blocks: Vec<u64> = (0..conversations.get(i).copied().unwrap_or(0)).collect();
            blocks.extend([1000 + i as u64]);
            blocks.extend((100..104).rev());
            b.apply(&format!("w{i:03}"), event(true, &blocks, &[]));
        }
        let prompt = system_prompt_and(12);
        for key in [None, Some(1), Some(99)] {
            let (ha, hb) = (
                a.hits("fp", &prompt, 1000, key),
                b.hits("fp", &prompt, 1000, key),
            );
            assert_eq!(ha.cached_tokens, hb.cached_tokens, "key {key:?}");
            let mut listed: Vec<&str> = ha.cached_tokens.keys().map(String::as_str).collect();
            listed.sort();
            assert_eq!(listed, ["w007", "w008", "w009", "w010", "w011"]);
            assert_eq!(ha.cached("w000"), 5 * 32, "left out: counted when drawn");
        }
        // Equal runs: the highest rendezvous weights of the key, the same on both.
        let a = shared_system_prompt(40, 5, &[3; 20]);
        let b = shared_system_prompt(40, 5, &[3; 20]);
        for key in [Some(1), Some(2)] {
            let ha = a.hits("fp", &system_prompt_and(3), 1000, key);
            let hb = b.hits("fp", &system_prompt_and(3), 1000, key);
            assert_eq!(ha.cached_tokens, hb.cached_tokens);
            let mut by_weight: Vec<(u64, String)> = (0..20)
                .map(|i| format!("w{i:03}"))
                .map(|id| {
                    (
                        rendezvous_weight(key.unwrap(), stable_hash(id.as_bytes())),
                        id,
                    )
                })
                .collect();
            by_weight.sort();
            let mut best: Vec<String> = by_weight
                .into_iter()
                .rev()
                .take(5)
                .map(|(_, id)| id)
                .collect();
            let mut listed: Vec<String> = ha.cached_tokens.keys().cloned().collect();
            best.sort();
            listed.sort();
            assert_eq!(listed, best, "key {key:?}");
        }
    }

    #[test]
    fn a_block_held_by_many_keeps_a_bitset_in_step_with_its_holders() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        let index = PrefixIndex::default();
        let mut holding: HashSet<String> = HashSet::new();
        let (mut bitsets, mut shared) = (0, 0);
        for round in 0..4000 {
            let id = format!("w{}", rng.random_range(0..300));
            match rng.random_range(0..4) {
                0 => {
                    index.forget(&id);
                    holding.remove(&id);
                }
                1 => {
                    index.apply(&id, event(true, &[], &[]));
                    holding.remove(&id);
                }
                // Stores block 1 more often than it drops it, then drops it more often: the
                // holders go from a few to most of 300 workers and back.
                _ if (round / 1000) % 2 == 0 => {
                    index.apply(&id, event(true, &[1, 2], &[]));
                    holding.insert(id.clone());
                }
                _ => {
                    index.apply(&id, event(false, &[], &[1]));
                    holding.remove(&id);
                }
            }
            if round % 100 == 0 {
                index.check();
                let hits = index.hits("fp", &[1, 2], 100, None);
                shared += usize::from(hits.shared.is_some());
                bitsets += usize::from(
                    index
                        .inner
                        .read()
                        .unwrap()
                        .holders
                        .values()
                        .any(|h| !h.bits.is_empty()),
                );
                for i in 0..300 {
                    let id = format!("w{i}");
                    let expected = if holding.contains(&id) { 64 } else { 0 };
                    assert_eq!(hits.cached(&id), expected, "round {round} {id}");
                }
            }
        }
        assert!(bitsets > 10 && shared > 10, "{bitsets} {shared}");
        let inner = index.inner.read().unwrap();
        assert!(
            inner
                .holders
                .values()
                .all(|h| h.bits.is_empty() || h.slots.len() >= 32)
        );
    }
}
