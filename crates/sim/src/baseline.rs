//! The baselines the policy is compared with. Both see the same stale adverts as the policy and
//! neither looks at the latency class or at KV headroom.

use std::collections::HashSet;
use std::ops::Bound;

use moe_common::registry::ClusterSnapshot;
use rand::Rng;

use moe_gateway::scheduler::Reservations;

/// Cycles through ready workers in id order.
#[derive(Debug, Default)]
pub struct RoundRobin {
    last: Option<String>,
}

impl RoundRobin {
    pub fn pick<'s>(
        &mut self,
        snapshot: &'s ClusterSnapshot,
        exclude: &HashSet<String>,
    ) -> Option<&'s str> {
        let usable = |id: &String| snapshot.workers[id].is_ready() && !exclude.contains(id);
        let after = match &self.last {
            Some(last) => snapshot
                .workers
                .range::<String, _>((Bound::Excluded(last), Bound::Unbounded)),
            None => snapshot.workers.range::<String, _>(..),
        };
        let id = after
            .map(|(id, _)| id)
            .find(|id| usable(id))
            .or_else(|| snapshot.workers.keys().find(|id| usable(id)))?;
        self.last = Some(id.clone());
        Some(id.as_str())
    }
}

/// The ready worker with the fewest active + queued streams in its advert plus this gateway's
/// placements on it since that advert; ties broken at random.
pub fn least_loaded<'s>(
    snapshot: &'s ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    rng: &mut impl Rng,
) -> Option<&'s str> {
    let mut best: Option<(&str, u32)> = None;
    let mut ties = 0u32;
    for (id, w) in &snapshot.workers {
        if !w.is_ready() || exclude.contains(id) {
            continue;
        }
        let since = reservations.by_worker.get(id).map_or(0, |list| {
            list.iter()
                .filter(|r| r.placed_unix_ms >= w.updated_unix_ms)
                .count() as u32
        });
        let load = w.load.active + w.load.queued + since;
        match best {
            Some((_, b)) if load > b => {}
            Some((_, b)) if load == b => {
                ties += 1;
                if rng.random_range(0..ties + 1) == 0 {
                    best = Some((id, load));
                }
            }
            _ => {
                best = Some((id, load));
                ties = 0;
            }
        }
    }
    best.map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_common::registry::{
        ADVERT_SCHEMA, Capacity, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed, WorkerAdvert,
        WorkerState,
    };
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::sync::Arc;

    fn snapshot(loads: &[u32]) -> ClusterSnapshot {
        let mut s = ClusterSnapshot::default();
        for (i, &active) in loads.iter().enumerate() {
            let w = WorkerAdvert {
                schema: ADVERT_SCHEMA,
                id: format!("w{i}"),
                endpoint: "http://h:1".into(),
                state: WorkerState::Ready,
                model: ModelInfo::default(),
                model_fingerprint: String::new(),
                decode_mode: None,
                batch_invariant: None,
                system_fingerprint: None,
                features: moe_common::registry::Features::all(),
                offload: OffloadInfo::default(),
                devices: vec![],
                memory: MemoryInfo::default(),
                capacity: Capacity {
                    context_tokens: 10,
                    free_kv_tokens: 10,
                    max_sequences: 1,
                },
                load: Load { active, queued: 0 },
                speed: Speed::default(),
                version: "t".into(),
                updated_unix_ms: 5,
            };
            s.workers.insert(w.id.clone(), Arc::new(w));
        }
        s
    }

    #[test]
    fn round_robin_cycles_and_skips_excluded_workers() {
        let s = snapshot(&[0, 0, 0]);
        let mut rr = RoundRobin::default();
        let none = HashSet::new();
        let picks: Vec<_> = (0..4)
            .map(|_| rr.pick(&s, &none).unwrap().to_string())
            .collect();
        assert_eq!(picks, ["w0", "w1", "w2", "w0"]);
        let exclude: HashSet<String> = ["w1".to_string()].into();
        assert_eq!(rr.pick(&s, &exclude), Some("w2"));
    }

    #[test]
    fn least_loaded_counts_placements_newer_than_the_advert() {
        let s = snapshot(&[2, 1]);
        let mut rng = StdRng::seed_from_u64(1);
        let mut res = Reservations::default();
        assert_eq!(
            least_loaded(&s, &res, &HashSet::new(), &mut rng),
            Some("w1")
        );
        res.by_worker.insert(
            "w1".into(),
            vec![
                moe_gateway::scheduler::Reservation {
                    kv_tokens: 1,
                    placed_unix_ms: 5
                };
                2
            ],
        );
        assert_eq!(
            least_loaded(&s, &res, &HashSet::new(), &mut rng),
            Some("w0")
        );
    }
}
