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
//! - [`prefix_score`]: cached prefix length from block hashes, for when workers publish the
//!   blocks they hold (issue 17); nothing calls it on the live path yet.

use std::collections::HashSet;

use moe_common::pb::GenerateRequest;
use moe_common::registry::{ClusterSnapshot, WorkerAdvert};
use rand::Rng;

use super::sampled::{evaluate, lookup};
use super::{Candidate, Demand, Policy, Ranking, Reservations, ScheduleError};

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

/// Streams on `w` (advert plus this gateway's placements since) per sequence slot.
pub fn load_with_local(w: &WorkerAdvert, reservations: &Reservations) -> f64 {
    let (_, local) = reservations.since(&w.id, w.updated_unix_ms);
    (w.load.active + w.load.queued + local) as f64 / w.capacity.max_sequences.max(1) as f64
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
