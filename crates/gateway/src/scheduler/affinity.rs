//! Prefix affinity: send requests that share a prompt prefix to the worker that probably has it
//! cached, so that several stateless gateways agree without talking, bounded by load.
//!
//! - [`prefix_key`]: a stable hash of the start of a request (its messages up to the first user
//!   message, or the start of its prompt): the same conversation has the same key on every turn
//!   and every gateway.
//! - [`rendezvous_top`]: highest-random-weight hashing of the key onto a pool's workers; every
//!   gateway with the same worker set ranks them alike, and a worker leaving moves only its keys.
//! - [`rank_with_prefix`]: the first rendezvous choice that passes the policy's own checks
//!   (ready, preferred pool, context, headroom) and whose load is at most (1 + ε) × the mean load
//!   of the candidates the policy found, else the next of a few choices, else no affinity.
//! - [`prefix_score`]: cached prefix length from block hashes.
//! - [`rank_with_hits`]: the live prefix-aware ranking (issue 17): the workers' published cache
//!   blocks ([`PrefixHits`]) are one more term of the policy's own scores, workers holding part
//!   of the prompt are considered even when sampling missed them, a hit counts only on workers
//!   within the load bound, and ties go to the rendezvous choice of the prefix key, so gateways
//!   that see the same cache events make the same choice.

use std::collections::HashSet;

use moe_common::pb::GenerateRequest;
use moe_common::registry::{ClusterSnapshot, WorkerAdvert};
use rand::Rng;

use moe_common::LatencyClass;

use super::sampled::{evaluate, evaluate_hits, lookup};
use super::{
    Candidate, Demand, Local, Policy, Pool, PrefixHits, Ranking, Reservations, ScheduleError,
    SpeedMeans, measured, pool_slot,
};

/// Bytes of the request start that make its key.
pub const PREFIX_KEY_BYTES: usize = 4096;

/// FNV-1a, 64 bits: the same on every gateway, process and version (unlike std's hasher).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A 64-bit mix (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The rendezvous weight of a worker (by its id's [`stable_hash`]) for a key.
pub fn rendezvous_weight(key: u64, worker_hash: u64) -> u64 {
    mix(key ^ mix(worker_hash))
}

/// The request's prefix key: the messages up to and including the first user message (role and
/// content), or the prompt, cut at [`PREFIX_KEY_BYTES`]. None for an empty request.
pub fn prefix_key(req: &GenerateRequest) -> Option<u64> {
    let mut bytes: Vec<u8> = Vec::new();
    if req.messages.is_empty() {
        bytes.extend_from_slice(req.prompt.as_bytes());
    }
    for m in &req.messages {
        bytes.extend_from_slice(m.role.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(m.content.as_bytes());
        bytes.push(0);
        if m.role == "user" || bytes.len() >= PREFIX_KEY_BYTES {
            break;
        }
    }
    bytes.truncate(PREFIX_KEY_BYTES);
    (!bytes.is_empty()).then(|| stable_hash(&bytes))
}

/// How many of the request's leading blocks the worker holds. Block hashes are chained (each
/// covers its predecessors), so the first miss ends the shared prefix.
pub fn prefix_score(request_blocks: &[u64], worker_cached: &HashSet<u64>) -> usize {
    request_blocks
        .iter()
        .take_while(|b| worker_cached.contains(b))
        .count()
}

/// Indices of the `n` highest-weight entries of `hashes` for `key`, best first. O(len).
pub fn rendezvous_top(key: u64, hashes: &[u64], n: usize) -> Vec<usize> {
    let mut top: Vec<(u64, usize)> = Vec::with_capacity(n + 1);
    for (i, h) in hashes.iter().enumerate() {
        let w = rendezvous_weight(key, *h);
        if top.len() == n && top.last().is_some_and(|&(low, _)| w <= low) {
            continue;
        }
        let at = top.partition_point(|&(x, _)| x > w);
        top.insert(at, (w, i));
        top.truncate(n);
    }
    top.into_iter().map(|(_, i)| i).collect()
}

/// Limits on affinity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affinity {
    /// A preferred worker may carry at most (1 + epsilon) × the mean load of the candidates.
    pub epsilon: f64,
    /// Rendezvous choices tried in order before giving affinity up.
    pub choices: usize,
}

impl Default for Affinity {
    fn default() -> Self {
        Affinity {
            epsilon: 0.25,
            choices: 3,
        }
    }
}

/// Streams on `w` (advert plus this gateway's placements since, less its streams ended since)
/// per sequence slot.
pub fn load_with_local(w: &WorkerAdvert, reservations: &Reservations) -> f64 {
    local_load(w, &reservations.local(w))
}

/// [`load_with_local`] from `w`'s [`Local`] already read.
fn local_load(w: &WorkerAdvert, local: &Local) -> f64 {
    (w.load.active + w.load.queued + local.placed).saturating_sub(local.ended) as f64
        / w.capacity.max_sequences.max(1) as f64
}

/// Streams per slot on `w` for the free-slot test of a hit on a conversation's own history:
/// [`local_load`] with this gateway's streams ended shortly before the advert's receipt also
/// taken off ([`Local::ended_within_lag`]).
fn slot_load(w: &WorkerAdvert, local: &Local) -> f64 {
    (w.load.active + w.load.queued + local.placed).saturating_sub(local.ended_within_lag) as f64
        / w.capacity.max_sequences.max(1) as f64
}

/// Whether a worker with load `preferred` may take a request by affinity when the candidates'
/// mean load is `mean`: at most (1 + ε) × mean, plus one slot's worth so idle pools work.
pub fn within_bound(preferred: f64, mean: f64, epsilon: f64, one_slot: f64) -> bool {
    preferred <= (1.0 + epsilon) * mean + one_slot
}

/// [`super::rank`], with the rendezvous choice for `prefix` moved to the front when it passes
/// every check and the load bound. Without a prefix, or on a retry, it is `rank` itself.
#[allow(clippy::too_many_arguments)]
pub fn rank_with_prefix(
    demand: &Demand,
    prefix: Option<u64>,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    (policy, affinity): (&Policy, Affinity),
    rng: &mut impl Rng,
) -> Result<Ranking, ScheduleError> {
    let mut ranking = super::rank(demand, snapshot, reservations, exclude, policy, rng)?;
    let Some(key) = prefix.filter(|_| exclude.is_empty()) else {
        return Ok(ranking);
    };
    // Only the preferred pool: when its best candidate is a spill, nothing there has room.
    let preferred: Vec<&Candidate> = ranking.candidates.iter().filter(|c| !c.spill).collect();
    if preferred.is_empty() {
        return Ok(ranking);
    }
    let mean = preferred
        .iter()
        .map(|c| load_with_local(&c.worker, reservations))
        .sum::<f64>()
        / preferred.len() as f64;
    let pool = super::preferred_pool(demand.class);
    let index = policy.index.get(snapshot);
    let Some(ids) = index.ids(demand.model, pool) else {
        return Ok(ranking);
    };
    let mut stale = false;
    for i in rendezvous_top(key, &ids.hashes, affinity.choices) {
        let Some(w) = lookup(snapshot, &ids.ids[i], demand, pool, &mut stale) else {
            continue;
        };
        let Some(c) = evaluate(w, demand, reservations, policy, false) else {
            continue;
        };
        let one_slot = 1.0 / w.capacity.max_sequences.max(1) as f64;
        if !within_bound(
            load_with_local(w, reservations),
            mean,
            affinity.epsilon,
            one_slot,
        ) {
            continue;
        }
        ranking.candidates.retain(|x| x.worker.id != c.worker.id);
        ranking.candidates.insert(0, c);
        break;
    }
    if stale {
        policy.index.invalidate();
    }
    Ok(ranking)
}

/// Prefix-aware ranking (issue 17): [`super::rank`] with the prompt tokens each worker holds
/// (`hits`, from the workers' cache events) as one more term:
///
/// - INTERACTIVE: predicted time to first token counts only the prompt tokens a worker does not
///   hold (prompt − cached) as prefill.
/// - BATCH: among the candidates of one pool (all with headroom for prompt + max_tokens), more
///   cached tokens first, then more free KV.
/// - Workers holding part of the prompt are candidates even when power-of-k sampling did not
///   draw them (same readiness, pool, context and headroom checks as any other): those `hits`
///   lists, i.e. those holding more than the run of blocks (nearly) every worker holds, at most
///   [`crate::prefix_index::LIST_BOUND`] of them. A run every worker holds (a shared system
///   prompt) does not tell workers apart: each candidate, drawn or listed, is scored with what
///   it holds ([`PrefixHits::cached`]), so it costs no evaluation of every worker.
/// - A hit counts only on a worker whose load (streams per slot, with this gateway's placements
///   since its advert) is at most (1 + ε) × the mean load of its pool's candidates plus one slot
///   ([`within_bound`]), or, for a hit covering at least half the prompt, that still has a free
///   sequence slot (counting this gateway's streams that ended shortly before the worker's
///   advert was received as ended: [`Local::ended_within_lag`]); otherwise it is ranked as if it
///   held nothing. A hot prefix fills the slots of the worker holding it and then spreads; a
///   shared system prompt alone does not draw new conversations past the bound.
/// - A worker that has not measured a speed yet (just started, or served a prompt but no decode
///   step) is scored with the mean measured speed of its pool's candidates rather than the
///   policy's defaults, as in [`super::rank`].
/// - Ties among the best (same pool and cached tokens, score within 1 %) go to the least loaded
///   (streams per slot, as in the load bound), then to the highest rendezvous weight of the
///   prefix key, not to chance, so gateways that see the same loads agree.
///
/// Spill rules, headroom checks and the fallback list are the policy's own, unchanged. With no
/// hits and no key it is exactly [`super::rank`].
#[allow(clippy::too_many_arguments)]
pub fn rank_with_hits(
    demand: &Demand,
    hits: &PrefixHits,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    (policy, affinity): (&Policy, Affinity),
    rng: &mut impl Rng,
) -> Result<Ranking, ScheduleError> {
    let mut ranking = super::rank_hits(demand, hits, snapshot, reservations, exclude, policy, rng)?;
    if hits.is_empty() {
        return Ok(ranking);
    }
    let pool = super::preferred_pool(demand.class);
    let mut ids: Vec<&String> = hits.cached_tokens.keys().collect();
    ids.sort();
    for id in ids {
        let known = ranking
            .candidates
            .iter()
            .chain(&ranking.fallback)
            .any(|c| c.worker.id == *id);
        let Some(w) = snapshot.workers.get(id) else {
            continue;
        };
        if known
            || exclude.contains(id)
            || Pool::of(w) != pool
            || !(demand.model.is_empty() || w.model.name == demand.model)
        {
            continue;
        }
        ranking
            .candidates
            .extend(evaluate_hits(w, demand, hits, reservations, policy, false));
    }
    // Per pool, over everything the policy may place on: the mean load, and the measured
    // speeds a worker that has measured none yet (just started) is assumed to have. Each
    // candidate's local view (this gateway's placements and ends since its advert) is read once.
    let local_of = |list: Vec<Candidate>| -> Vec<(Candidate, Local)> {
        list.into_iter()
            .map(|c| {
                let local = reservations.local(&c.worker);
                (c, local)
            })
            .collect()
    };
    let candidates = local_of(std::mem::take(&mut ranking.candidates));
    let fallback = local_of(std::mem::take(&mut ranking.fallback));
    let mut pools = [PoolStats::default(); 2];
    for (c, local) in candidates.iter().chain(&fallback) {
        pools[pool_slot(c.pool)].add(&c.worker, local);
    }
    let assumed = [
        pools[0].speeds.assumed(policy),
        pools[1].speeds.assumed(policy),
    ];
    let order = |list: Vec<(Candidate, Local)>| -> Vec<Candidate> {
        let mut scored: Vec<(Candidate, u32, f64)> = list
            .into_iter()
            .map(|(mut c, local)| {
                let stats = &pools[pool_slot(c.pool)];
                let held = hits.cached(&c.worker.id);
                let mut cached = held;
                let one_slot = 1.0 / c.worker.capacity.max_sequences.max(1) as f64;
                let load = local_load(&c.worker, &local);
                // A hit counts within the load bound; one that covers at least half the prompt
                // (the conversation's own history, not just a shared system prompt) also while
                // the worker can start the request at once (a sequence slot is free).
                let free_slot = slot_load(&c.worker, &local) + one_slot <= 1.0 + 1e-9
                    && u64::from(cached) * 2 >= u64::from(demand.prompt_tokens);
                if cached > 0
                    && !free_slot
                    && !within_bound(load, stats.mean_load(), affinity.epsilon, one_slot)
                {
                    cached = 0;
                }
                if cached != held || !measured(&c.worker) {
                    let assumed = &assumed[pool_slot(c.pool)];
                    c.score = super::score(&c.worker, demand, &local, cached, assumed);
                }
                (c, cached, load)
            })
            .collect();
        let group = |cached: u32| match demand.class {
            LatencyClass::Interactive => 0,
            LatencyClass::Batch => cached,
        };
        scored.sort_by(|(a, ca, _), (b, cb, _)| {
            a.spill
                .cmp(&b.spill)
                .then(group(*cb).cmp(&group(*ca)))
                .then(a.score.total_cmp(&b.score))
                .then_with(|| a.worker.id.cmp(&b.worker.id))
        });
        if let (Some(key), Some((best, best_cached, _))) = (hits.key, scored.first()) {
            let tol = best.score.abs() * 0.01 + 1e-9;
            let (spill, g, score) = (best.spill, group(*best_cached), best.score);
            let tied = scored
                .iter()
                .take_while(|(c, cached, _)| {
                    c.spill == spill && group(*cached) == g && (c.score - score).abs() <= tol
                })
                .count();
            // Among the tied, the least loaded first (streams per slot, this gateway's
            // placements and ends since the adverts counted), then the key's rendezvous choice.
            // Streams an advert already shows add only a fraction of a decode step each to the
            // predicted TTFT, well inside the tie: by the key alone, a burst of first turns put
            // four of eight on one of three equal workers (the chat benchmark, 4 of 10 runs).
            let weight = |i: usize| {
                let id = &scored[i].0.worker.id;
                rendezvous_weight(key, stable_hash(id.as_bytes()))
            };
            let pick = (0..tied)
                .max_by(|&i, &j| {
                    let (li, lj) = (scored[i].2, scored[j].2);
                    let fewer = if (li - lj).abs() <= 1e-9 {
                        std::cmp::Ordering::Equal
                    } else {
                        lj.total_cmp(&li)
                    };
                    fewer.then_with(|| weight(i).cmp(&weight(j)))
                })
                .unwrap_or(0);
            scored.swap(0, pick);
        }
        scored.into_iter().map(|(c, _, _)| c).collect()
    };
    ranking.candidates = order(candidates);
    ranking.fallback = order(fallback);
    Ok(ranking)
}

/// One pool's candidates, for [`rank_with_hits`].
#[derive(Clone, Copy, Debug, Default)]
struct PoolStats {
    load: f64,
    n: usize,
    speeds: SpeedMeans,
}

impl PoolStats {
    fn add(&mut self, w: &WorkerAdvert, local: &Local) {
        self.load += local_load(w, local);
        self.n += 1;
        self.speeds.add(w);
    }

    fn mean_load(&self) -> f64 {
        self.load / self.n.max(1) as f64
    }
}
