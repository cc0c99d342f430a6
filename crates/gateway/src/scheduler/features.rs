//! Mixed-version fleets: a request goes only to workers whose advert lists every feature it
//! needs ([`Features::needed_by`]); adverts from workers older than the `features` field list
//! none. When some workers serve the model but none has the feature, the request is refused
//! with UNAVAILABLE naming the feature (a rolling upgrade may bring one).
//!
//! Prefix-aware routing (issue 17) subscribes to a worker's `moe.v1.Worker/WatchPrefixCache`
//! stream, and asks it to tokenize, only when it advertises `prefix_cache_events`
//! ([`has_prefix_cache_events`]); other workers count as holding no cached prefix.
//!
//! A request with `batch_invariant` set goes only to workers advertising `batch_invariant:
//! true`; when none serving its model does, it fails with FAILED_PRECONDITION
//! ([`ScheduleError::NotBatchInvariant`]) rather than run where its output may depend on other
//! traffic.

use std::sync::Arc;

use moe_common::registry::{ClusterSnapshot, Feature, Features, WorkerAdvert};

use super::{Demand, ScheduleError};

/// The workers of `snapshot` that can serve `demand`: those with every feature it needs and,
/// when it has `batch_invariant` set, those advertising `batch_invariant: true` (absent, from an
/// older worker, does not count). The snapshot itself when every worker can (a fleet on one
/// version: no copy), else a copy without the others. Workers of other models are left as they
/// are (the ranking filters by model and reports on it).
///
/// Every placement goes through here (first placement, retries, spill-over, migration), so a
/// request with `batch_invariant` never lands on another worker. When workers serve the model
/// but none qualifies: UNAVAILABLE naming the missing feature (an upgrade may bring it), or, when
/// some have the features but none is batch-invariant, [`ScheduleError::NotBatchInvariant`].
pub fn capable(
    snapshot: Arc<ClusterSnapshot>,
    demand: &Demand,
) -> Result<Arc<ClusterSnapshot>, ScheduleError> {
    let needs = demand.needs;
    let invariant = |w: &WorkerAdvert| !demand.batch_invariant || w.batch_invariant == Some(true);
    if (needs.is_empty() && !demand.batch_invariant)
        || snapshot
            .workers
            .values()
            .all(|w| w.features.covers(needs) && invariant(w))
    {
        return Ok(snapshot);
    }
    let serves = |w: &WorkerAdvert| demand.model.is_empty() || w.model.name == demand.model;
    let mut filtered = ClusterSnapshot {
        revision: snapshot.revision,
        workers: Default::default(),
        rejected: snapshot.rejected.clone(),
    };
    let mut lacking = 0;
    let mut missing = Features::NONE;
    let mut variant = 0;
    for (id, w) in &snapshot.workers {
        let lacks = w.features.lacking(needs);
        if lacks.is_empty() && invariant(w) {
            filtered.workers.insert(id.clone(), w.clone());
        } else if serves(w) {
            if lacks.is_empty() {
                variant += 1;
            } else {
                lacking += 1;
                missing = missing.union(lacks);
            }
        }
    }
    if lacking + variant > 0 && !filtered.workers.values().any(|w| serves(w)) {
        let model = if demand.model.is_empty() {
            String::new()
        } else {
            format!(" serving model {:?}", demand.model)
        };
        if variant > 0 {
            return Err(ScheduleError::NotBatchInvariant {
                model,
                workers: variant,
            });
        }
        return Err(ScheduleError::Unavailable(format!(
            "no worker{model} has the feature(s) this request needs: {missing} \
             ({lacking} worker(s){model} lack it; they run an older moe-worker)"
        )));
    }
    Ok(Arc::new(filtered))
}

/// Whether `w` serves the `moe.v1.Worker` service (`WatchPrefixCache`, `Tokenize`): it lists
/// `prefix_cache_events`. Workers older than the service (or than the `features` field) do not,
/// and gateways neither subscribe to them nor ask them to tokenize.
pub fn has_prefix_cache_events(w: &WorkerAdvert) -> bool {
    w.features.has(Feature::PrefixCacheEvents)
}
