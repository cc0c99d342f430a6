//! Sampled placement: power-of-k choices within the preferred pool, read through a per-pool index
//! of worker ids, so a decision costs O(k log n) instead of a scan and sort of every worker.
//!
//! - The index ([`PoolIndex`]) lists worker ids by model and pool. It holds no live fields: each
//!   sampled id is looked up in the current snapshot, and a sample that is gone or changed pool
//!   or model is skipped and makes the index rebuild. It is rebuilt when the number of workers
//!   changes and after as many decisions as it has workers (O(1) amortised per decision), so a
//!   worker that joined while another left is sampled within that many decisions.
//! - Safety is the full scan's: every sampled worker passes the same readiness, context and
//!   headroom checks, and only preferred-pool workers are sampled.
//! - A nearly saturated pool (issue 17): when no sampled worker fits (after a second, larger
//!   sample), the samples are drawn again, the same way (k, then 4k), from the preferred-pool
//!   workers whose *advertised* free KV is enough, listed by the snapshot's [`RoomIndex`] (one
//!   pass over the snapshot, as before, for the first such decision on a snapshot; later ones
//!   on the same snapshot read the list). When none of those draws fits either (this gateway's own
//!   placements since the adverts took the room), every one of those workers is evaluated, and
//!   only when none fits does the decision fall back to the full scan, which applies
//!   spill-over, builds the fallback list and returns the precise error. (Before, every worker
//!   with room was evaluated as soon as the samples missed: 200 at 10,000 workers with 1 full
//!   worker in 50 free, which cost more than the pass over the snapshot.)
//! - The [`RoomIndex`] is derived from one snapshot and cached ([`IndexCache::rooms`]) until the
//!   snapshot changes (another revision, worker count, first or last advert, or feature or
//!   `batch_invariant` filter);
//!   it is built lazily by the first decision on that snapshot that needs it, and again only for
//!   a demand needing less than half of what it was built for.
//! - Several gateways draw different samples, so they do not all pick the same worker.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use moe_common::registry::{ClusterSnapshot, Features, WorkerAdvert};
use rand::Rng;

use super::{Candidate, Demand, Policy, Pool, PrefixHits, Ranking, Reservations, ScheduleError};

/// How decisions are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// Score and sort every worker (the policy before issue 17; kept for comparison).
    FullScan,
    /// Sample `k` workers of the preferred pool (pools of at most `scan_below` are scanned).
    PowerOfK { k: usize, scan_below: usize },
}

impl Default for Sampling {
    fn default() -> Self {
        // k = 4: in the simulator (docs/benchmarks/scheduler-simulation.md) k = 2 packed batch
        // work worse than the full scan (TTFT p50 2.1 s vs 1.6 s), k = 4 about as well (1.85 s)
        // with a lower p99, and four gateways' batch p99 fell from 100 s (scan) to 15 s.
        Sampling::PowerOfK {
            k: 4,
            scan_below: 16,
        }
    }
}

/// Worker ids by model ("" = every model) and pool, as of one snapshot.
#[derive(Debug, Default)]
pub struct PoolIndex {
    by_model: HashMap<String, [PoolIds; 2]>,
    workers: usize,
    uses: AtomicUsize,
}

/// One pool's worker ids, with each id's stable hash for rendezvous hashing.
#[derive(Debug, Default)]
pub struct PoolIds {
    pub ids: Vec<String>,
    pub hashes: Vec<u64>,
}

impl PoolIds {
    fn push(&mut self, id: &str) {
        self.ids.push(id.to_string());
        self.hashes
            .push(super::affinity::stable_hash(id.as_bytes()));
    }
}

fn slot(pool: Pool) -> usize {
    match pool {
        Pool::Fast => 0,
        Pool::Offload => 1,
    }
}

impl PoolIndex {
    pub fn build(snapshot: &ClusterSnapshot) -> PoolIndex {
        let mut by_model: HashMap<String, [PoolIds; 2]> = HashMap::new();
        let mut any: [PoolIds; 2] = Default::default();
        for w in snapshot.workers.values() {
            let s = slot(Pool::of(w));
            any[s].push(&w.id);
            match by_model.get_mut(&w.model.name) {
                Some(pools) => pools[s].push(&w.id),
                None => {
                    let mut pools: [PoolIds; 2] = Default::default();
                    pools[s].push(&w.id);
                    by_model.insert(w.model.name.clone(), pools);
                }
            }
        }
        by_model.insert(String::new(), any);
        PoolIndex {
            by_model,
            workers: snapshot.workers.len(),
            uses: AtomicUsize::new(0),
        }
    }

    /// The ids of `model`'s workers in `pool` (every model when `model` is empty).
    pub fn pool(&self, model: &str, pool: Pool) -> &[String] {
        self.ids(model, pool).map_or(&[][..], |p| &p.ids[..])
    }

    /// The ids and their hashes of `model`'s workers in `pool`.
    pub fn ids(&self, model: &str, pool: Pool) -> Option<&PoolIds> {
        self.by_model.get(model).map(|pools| &pools[slot(pool)])
    }

    fn fresh_for(&self, snapshot: &ClusterSnapshot) -> bool {
        self.workers == snapshot.workers.len()
            && self.uses.fetch_add(1, Ordering::Relaxed) < self.workers.max(64)
    }
}

/// The workers of one model and pool whose advertised free KV is at least a floor, as of one
/// snapshot, with that free KV in a compact array of its own: the workers whose advert has room
/// for a demand needing at least the floor are read from a few kilobytes instead of every advert
/// of the snapshot. Built by one pass over the snapshot, cheap checks first (what the sampled
/// path's fallback did on every decision before), so a snapshot used once costs no more.
#[derive(Debug, Default)]
pub struct RoomIndex {
    pool: Option<Pool>,
    floor: u32,
    /// In snapshot order (the order a pass over the snapshot meets them).
    free_kv: Vec<u32>,
    workers: Vec<Arc<WorkerAdvert>>,
}

impl RoomIndex {
    /// The workers of `model` (every model when empty) in `pool` advertising at least `floor`
    /// free KV tokens in `snapshot`.
    pub fn build(snapshot: &ClusterSnapshot, model: &str, pool: Pool, floor: u32) -> RoomIndex {
        let mut index = RoomIndex {
            pool: Some(pool),
            floor,
            ..RoomIndex::default()
        };
        for w in snapshot.workers.values() {
            if w.capacity.free_kv_tokens >= floor
                && Pool::of(w) == pool
                && (model.is_empty() || w.model.name == model)
            {
                index.free_kv.push(w.capacity.free_kv_tokens);
                index.workers.push(w.clone());
            }
        }
        index
    }

    /// Whether it lists every worker of its pool with room for `needed` tokens.
    pub fn covers(&self, pool: Pool, needed: u32) -> bool {
        self.pool == Some(pool) && needed >= self.floor
    }

    /// The listed workers advertising at least `needed` free KV tokens, in snapshot order:
    /// every worker of the pool that does when [`RoomIndex::covers`] `needed`.
    pub fn with_room(&self, needed: u32) -> impl Iterator<Item = &Arc<WorkerAdvert>> {
        self.free_kv
            .iter()
            .zip(&self.workers)
            .filter(move |(free, _)| **free >= needed)
            .map(|(_, w)| w)
    }

    /// Workers listed.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }
}

/// What a [`RoomIndex`] was built from. The first and last adverts are held (not just their
/// addresses), so a later snapshot cannot reuse their allocations: a snapshot whose revision,
/// worker count and first and last adverts are the same is the same snapshot, as long as a
/// snapshot changed in place also changes its revision (the registry watcher publishes a new
/// snapshot per revision; the simulator bumps the revision on every change).
#[derive(Debug)]
struct RoomKey {
    revision: i64,
    workers: usize,
    first: Option<Arc<WorkerAdvert>>,
    last: Option<Arc<WorkerAdvert>>,
    /// The features the snapshot was filtered by (`features::capable`): two filters of one
    /// revision differ.
    needs: Features,
    /// Whether it was also filtered to batch-invariant workers (`features::capable`).
    batch_invariant: bool,
    model: String,
    pool: Pool,
}

impl RoomKey {
    fn of(snapshot: &ClusterSnapshot, filter: Filter<'_>, pool: Pool) -> RoomKey {
        let (model, needs, batch_invariant) = filter;
        RoomKey {
            revision: snapshot.revision,
            workers: snapshot.workers.len(),
            first: snapshot.workers.values().next().cloned(),
            last: snapshot.workers.values().next_back().cloned(),
            needs,
            batch_invariant,
            model: model.to_string(),
            pool,
        }
    }

    /// Built from the same snapshot (whatever the model and filter).
    fn same_snapshot(&self, other: &RoomKey) -> bool {
        let ptr = |a: &Option<Arc<WorkerAdvert>>, b: &Option<Arc<WorkerAdvert>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        self.revision == other.revision
            && self.workers == other.workers
            && ptr(&self.first, &other.first)
            && ptr(&self.last, &other.last)
    }

    fn same(&self, other: &RoomKey) -> bool {
        self.same_snapshot(other)
            && self.needs == other.needs
            && self.batch_invariant == other.batch_invariant
            && self.model == other.model
            && self.pool == other.pool
    }
}

/// What a snapshot was filtered by for a demand: its model, the features it needs and its
/// `batch_invariant` (`features::capable`).
pub type Filter<'a> = (&'a str, Features, bool);

/// Room indexes kept at once (one per model and pool asked for on the current snapshot).
const ROOM_INDEXES: usize = 4;

/// The room indexes of the current snapshot, oldest first.
type RoomIndexes = Vec<(RoomKey, Arc<RoomIndex>)>;

/// The index shared by one gateway's decisions (clones share it).
#[derive(Clone, Debug, Default)]
pub struct IndexCache {
    current: Arc<Mutex<Option<Arc<PoolIndex>>>>,
    rooms: Arc<Mutex<RoomIndexes>>,
}

impl IndexCache {
    /// The cached index, rebuilt first when it is stale for `snapshot`.
    pub fn get(&self, snapshot: &ClusterSnapshot) -> Arc<PoolIndex> {
        if let Some(index) = self.current.lock().expect("index lock").as_ref()
            && index.fresh_for(snapshot)
        {
            return index.clone();
        }
        let index = Arc::new(PoolIndex::build(snapshot));
        *self.current.lock().expect("index lock") = Some(index.clone());
        index
    }

    /// Forces a rebuild at the next decision (a sampled id was stale).
    pub fn invalidate(&self) {
        *self.current.lock().expect("index lock") = None;
    }

    /// A [`RoomIndex`] of `model`'s workers in `pool` for `snapshot` (filtered by `needs` and
    /// `batch_invariant`) that
    /// covers `needed`: the one built for an earlier decision on the same snapshot, or a new one
    /// with a floor of half of `needed` (so that later, smaller demands mostly find it too).
    /// Built outside the lock: two decisions may both build one.
    pub fn rooms(
        &self,
        snapshot: &ClusterSnapshot,
        filter: Filter<'_>,
        pool: Pool,
        needed: u32,
    ) -> Arc<RoomIndex> {
        let model = filter.0;
        let key = RoomKey::of(snapshot, filter, pool);
        {
            let rooms = self.rooms.lock().expect("room index lock");
            if let Some((_, index)) = rooms
                .iter()
                .find(|(k, i)| k.same(&key) && i.covers(pool, needed))
            {
                return index.clone();
            }
        }
        let index = Arc::new(RoomIndex::build(snapshot, model, pool, needed / 2));
        let mut rooms = self.rooms.lock().expect("room index lock");
        // Another snapshot: the indexes of the one before are of no more use.
        rooms.retain(|(k, _)| k.same_snapshot(&key) && !k.same(&key));
        if rooms.len() >= ROOM_INDEXES {
            rooms.remove(0);
        }
        rooms.push((key, index.clone()));
        index
    }
}

/// A worker the sampled path may offer: the current advert, if it still belongs where the index
/// put it. `None` with `stale` set when it does not.
pub(super) fn lookup<'s>(
    snapshot: &'s ClusterSnapshot,
    id: &str,
    demand: &Demand,
    pool: Pool,
    stale: &mut bool,
) -> Option<&'s Arc<WorkerAdvert>> {
    let w = snapshot.workers.get(id);
    match w {
        Some(w)
            if Pool::of(w) == pool && (demand.model.is_empty() || w.model.name == demand.model) =>
        {
            Some(w)
        }
        _ => {
            *stale = true;
            None
        }
    }
}

/// Scores `w` for `demand` if it is ready and has room; the full scan's checks.
pub(super) fn evaluate(
    w: &Arc<WorkerAdvert>,
    demand: &Demand,
    reservations: &Reservations,
    policy: &Policy,
    spill: bool,
) -> Option<Candidate> {
    evaluate_hits(
        w,
        demand,
        &PrefixHits::default(),
        reservations,
        policy,
        spill,
    )
}

/// [`evaluate`], the score counting the prompt tokens `w` holds (`hits`).
pub(super) fn evaluate_hits(
    w: &Arc<WorkerAdvert>,
    demand: &Demand,
    hits: &PrefixHits,
    reservations: &Reservations,
    policy: &Policy,
    spill: bool,
) -> Option<Candidate> {
    if !w.is_ready() {
        return None;
    }
    let needed = demand.kv_tokens();
    let local = reservations.local(w);
    if needed > w.capacity.context_tokens || local.free_kv < needed {
        return None;
    }
    Some(Candidate {
        worker: w.clone(),
        pool: Pool::of(w),
        score: super::score(w, demand, &local, hits.cached(&w.id), policy),
        spill,
    })
}

/// Sampled decision for a first placement (nothing excluded); the full scan when the pool is
/// small or no sampled worker fits.
pub(super) fn rank_sampled(
    demand: &Demand,
    hits: &PrefixHits,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    policy: &Policy,
    (k, scan_below): (usize, usize),
    rng: &mut impl Rng,
) -> Result<Ranking, ScheduleError> {
    let full = |rng: &mut _| {
        super::rank_full_hits(
            demand,
            hits,
            snapshot,
            reservations,
            &HashSet::new(),
            policy,
            rng,
        )
    };
    let index = policy.index.get(snapshot);
    let preferred = super::preferred_pool(demand.class);
    let ids = index.pool(demand.model, preferred);
    if ids.len() < scan_below.max(k + 1) {
        return full(rng);
    }
    let mut stale = false;
    let mut found: Vec<Candidate> = Vec::with_capacity(k);
    // A first sample of k; if none fits, one of 4k before scanning everything.
    for draws in [k, 4 * k] {
        for _ in 0..draws {
            let id = &ids[rng.random_range(0..ids.len())];
            if found.iter().any(|c| c.worker.id == *id) {
                continue;
            }
            let Some(w) = lookup(snapshot, id, demand, preferred, &mut stale) else {
                continue;
            };
            found.extend(evaluate_hits(w, demand, hits, reservations, policy, false));
        }
        if !found.is_empty() {
            break;
        }
    }
    if stale {
        policy.index.invalidate();
    }
    if found.is_empty() {
        found = with_room(
            demand,
            hits,
            snapshot,
            reservations,
            policy,
            (preferred, k),
            rng,
        );
        if found.is_empty() {
            return full(rng);
        }
    }
    rescore_unmeasured(&mut found, demand, hits, reservations, policy);
    found.sort_by(|a, b| {
        a.score.total_cmp(&b.score).then_with(|| {
            reservations
                .streams(&a.worker.id)
                .cmp(&reservations.streams(&b.worker.id))
        })
    });
    super::two_choices(&mut found, reservations, rng);
    Ok(Ranking {
        candidates: found,
        fallback: Vec::new(),
        queued: false,
    })
}

/// Scores the candidates that have not measured both speeds again, with the mean measured speeds
/// of the candidates' pools in place of the policy's defaults (see `super::assumed_speeds`);
/// nothing to do when every candidate has measured both.
pub(super) fn rescore_unmeasured(
    found: &mut [Candidate],
    demand: &Demand,
    hits: &PrefixHits,
    reservations: &Reservations,
    policy: &Policy,
) {
    if found.iter().all(|c| super::measured(&c.worker)) {
        return;
    }
    let assumed = super::assumed_speeds(found.iter().map(|c| c.worker.as_ref()), policy);
    for c in found.iter_mut().filter(|c| !super::measured(&c.worker)) {
        let local = reservations.local(&c.worker);
        let p = &assumed[super::pool_slot(c.pool)];
        c.score = super::score(&c.worker, demand, &local, hits.cached(&c.worker.id), p);
    }
}

/// Preferred-pool workers with room, unsorted, from those whose advertised free KV is enough
/// (the snapshot's [`RoomIndex`]): a sample of `k`, then one of `4k`, then all of them, until one
/// passes the full checks (this gateway's placements since the advert may have taken its room).
fn with_room(
    demand: &Demand,
    hits: &PrefixHits,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    policy: &Policy,
    (preferred, k): (Pool, usize),
    rng: &mut impl Rng,
) -> Vec<Candidate> {
    let needed = demand.kv_tokens();
    let rooms = policy.index.rooms(
        snapshot,
        (demand.model, demand.needs, demand.batch_invariant),
        preferred,
        needed,
    );
    let roomy: Vec<&Arc<WorkerAdvert>> = rooms.with_room(needed).collect();
    let evaluate =
        |w: &Arc<WorkerAdvert>| evaluate_hits(w, demand, hits, reservations, policy, false);
    let mut found: Vec<Candidate> = Vec::with_capacity(k);
    for draws in [k, 4 * k] {
        if roomy.len() <= draws {
            break;
        }
        for _ in 0..draws {
            let w = roomy[rng.random_range(0..roomy.len())];
            if found.iter().any(|c| c.worker.id == w.id) {
                continue;
            }
            found.extend(evaluate(w));
        }
        if !found.is_empty() {
            return found;
        }
    }
    roomy.into_iter().filter_map(evaluate).collect()
}
