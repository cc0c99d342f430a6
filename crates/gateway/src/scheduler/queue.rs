//! Waiting instead of refusing (issue 16): when no worker has KV headroom for a request now,
//! the request goes to the worker where it should wait least, whose own admission queue holds
//! it (bounded by the worker's `--max-queue` and `--queue-timeout`, INTERACTIVE admitted before
//! BATCH, with slots reserved for INTERACTIVE). The worker refuses with RESOURCE_EXHAUSTED when
//! its queue is full or the wait times out, and the gateway may then try another worker.
//!
//! Why at the worker and not in a gateway queue: the worker knows the moment a slot frees (a
//! gateway sees it one advert later, up to a few hundred milliseconds), every gateway's requests
//! meet in one queue that already orders the classes, and a gateway holds no queued state that
//! a restart would lose.
//!
//! [`expected_wait`] is what the gateway tells clients about that wait: the retry hint of its
//! refusals (`crate::admission::retry_hint`) and the check that refuses at once a request whose
//! deadline would pass before a worker could start it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use moe_common::LatencyClass;
use moe_common::registry::{ClusterSnapshot, WorkerAdvert};

use super::{
    Candidate, Demand, Policy, Pool, Ranking, Reservations, ScheduleError, Spill, load,
    predicted_ttft, preferred_pool,
};

/// `ranked` when it has a candidate; otherwise, when every worker is short of headroom, the
/// workers that would queue the request, fewest expected waiters first (see [`rank_queued`]).
/// Errors other than "no headroom" are returned as they are.
pub fn or_wait(
    ranked: Result<Ranking, ScheduleError>,
    demand: &Demand,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    policy: &Policy,
) -> Result<Ranking, ScheduleError> {
    match ranked {
        Ok(r) if !r.candidates.is_empty() => Ok(r),
        Ok(r) => {
            // Only the other pool has room and this class may not spill there: wait in the
            // preferred pool, keeping the other pool as the retry fallback.
            let mut q =
                rank_queued(demand, snapshot, reservations, exclude, policy).unwrap_or_default();
            if q.candidates.is_empty() {
                return Ok(r);
            }
            q.fallback = r.fallback;
            Ok(q)
        }
        Err(ScheduleError::NoHeadroom { needed, reason }) => {
            rank_queued(demand, snapshot, reservations, exclude, policy).map_err(|e| match e {
                ScheduleError::Unavailable(_) => ScheduleError::NoHeadroom { needed, reason },
                e => e,
            })
        }
        Err(e) => Err(e),
    }
}

/// How long `demand` should expect to wait before a worker could start it (admit it and begin
/// its prefill): the least over ready workers of its model whose context holds it of the
/// predicted time to first token less the request's own prefill, i.e. the wait for a sequence
/// to finish where every slot is taken (counting this gateway's placements since each advert).
/// None when no worker could take it at all. A worker short of KV headroom but with a free slot
/// predicts no wait: this errs towards admitting, never towards refusing.
pub fn expected_wait(
    demand: &Demand,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    policy: &Policy,
) -> Option<Duration> {
    let needed = demand.kv_tokens();
    let start_only = Demand {
        prompt_tokens: 0,
        ..demand.clone()
    };
    snapshot
        .workers
        .values()
        .filter(|w| {
            (demand.model.is_empty() || w.model.name == demand.model)
                && w.is_ready()
                && needed <= w.capacity.context_tokens
        })
        .map(|w| {
            let (_, local_streams) = reservations.since(&w.id, w.updated_unix_ms);
            predicted_ttft(w, &start_only, local_streams, policy)
        })
        .min_by(f64::total_cmp)
        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0)))
}

/// Ready, untried workers of the model whose context holds prompt + max_tokens, ranked by
/// predicted time to first token (which counts the sequences running and queued there and this
/// gateway's placements since the advert). The class's preferred pool comes first; the other
/// pool is a candidate when the spill rule allows it, or when the preferred pool has no such
/// worker and spill is not `off`; a retry fallback otherwise. The ranking is marked `queued`.
pub fn rank_queued(
    demand: &Demand,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    policy: &Policy,
) -> Result<Ranking, ScheduleError> {
    let needed = demand.kv_tokens();
    let usable: Vec<&Arc<WorkerAdvert>> = snapshot
        .workers
        .values()
        .filter(|w| {
            (demand.model.is_empty() || w.model.name == demand.model)
                && w.is_ready()
                && !exclude.contains(&w.id)
        })
        .collect();
    if usable.is_empty() {
        return Err(ScheduleError::Unavailable(
            "no ready, untried worker serves the model".into(),
        ));
    }
    let largest = usable
        .iter()
        .map(|w| w.capacity.context_tokens)
        .max()
        .unwrap_or(0);
    if needed > largest {
        return Err(ScheduleError::PromptTooLong { needed, largest });
    }
    let preferred = preferred_pool(demand.class);
    let spill = match demand.class {
        LatencyClass::Interactive => policy.interactive_spill,
        LatencyClass::Batch => policy.batch_spill,
    };
    let mut own = Vec::new();
    let mut other = Vec::new();
    for w in usable {
        if needed > w.capacity.context_tokens {
            continue;
        }
        let (_, local_streams) = reservations.since(&w.id, w.updated_unix_ms);
        let pool = Pool::of(w);
        let c = Candidate {
            worker: w.clone(),
            pool,
            score: predicted_ttft(w, demand, local_streams, policy),
            spill: pool != preferred,
        };
        if pool == preferred {
            own.push(c);
        } else {
            other.push(c);
        }
    }
    let by_score = |a: &Candidate, b: &Candidate| a.score.total_cmp(&b.score);
    own.sort_by(by_score);
    other.sort_by(by_score);
    let spill_allowed = |c: &Candidate| match spill {
        Spill::On => true,
        Spill::Off => false,
        Spill::BelowLoad(t) => load(&c.worker) < t,
    };
    let mut ranking = Ranking {
        candidates: own,
        fallback: Vec::new(),
        queued: true,
    };
    if ranking.candidates.is_empty() {
        // Nowhere in the preferred pool: waiting in the other pool beats a refusal, unless the
        // class may never spill there (`Spill::Off`): then it is a retry fallback only.
        if spill == Spill::Off {
            ranking.fallback = other;
        } else {
            ranking.candidates = other;
        }
    } else {
        let (allowed, rest): (Vec<_>, Vec<_>) = other.into_iter().partition(spill_allowed);
        ranking.candidates.extend(allowed);
        ranking.fallback = rest;
    }
    Ok(ranking)
}
