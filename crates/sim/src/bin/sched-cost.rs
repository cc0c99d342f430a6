//! `moe-sched-cost`: wall-clock cost of one placement decision (`scheduler::rank`) at 100, 1,000
//! and 10,000 workers, the full scan (the policy before issue 17) next to sampled power-of-k, in
//! one run, and the live prefix-aware decision (`scheduler::affinity::rank_with_hits`, sampled,
//! with three workers holding part of the prompt). Also times an index rebuild and a clone of
//! the reservations (what the router did per decision). A few seconds in all; prints a markdown
//! table.

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_common::LatencyClass;
use moe_common::registry::{
    ADVERT_SCHEMA, Capacity, ClusterSnapshot, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed,
    WorkerAdvert, WorkerState,
};
use moe_gateway::scheduler::affinity::{self, Affinity};
use moe_gateway::scheduler::{
    self, Demand, Policy, PoolIndex, PrefixHits, Reservation, Reservations, Sampling,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn advert(i: usize, full: bool, free_kv: u32, rng: &mut StdRng) -> WorkerAdvert {
    let id = format!("worker-{i:05}");
    WorkerAdvert {
        schema: ADVERT_SCHEMA,
        endpoint: format!("http://{id}:50061"),
        id,
        state: WorkerState::Ready,
        model: ModelInfo {
            name: "gpt-oss-20b".into(),
            n_layer: 24,
            ..Default::default()
        },
        model_fingerprint: String::new(),
        features: moe_common::registry::Features::all(),
        offload: OffloadInfo {
            mode: if full { "full" } else { "cpu-moe" }.into(),
            n_cpu_moe: if full { 0 } else { 24 },
            profile: if full { "full" } else { "cpu-moe" }.into(),
        },
        devices: vec![],
        memory: MemoryInfo::default(),
        capacity: Capacity {
            context_tokens: 32768,
            free_kv_tokens: free_kv,
            max_sequences: 16,
        },
        load: Load {
            active: rng.random_range(0..16),
            queued: rng.random_range(0..4),
        },
        speed: Speed {
            decode_tokens_per_second: 200.0,
            prefill_tokens_per_second: 5000.0,
        },
        version: "bench".into(),
        updated_unix_ms: 1000,
    }
}

/// `n` workers, 30 % full; `saturated`: only one full worker in 50 has room.
fn cluster(n: usize, saturated: bool) -> (ClusterSnapshot, Reservations) {
    let mut rng = StdRng::seed_from_u64(n as u64);
    let mut snapshot = ClusterSnapshot::default();
    let mut reservations = Reservations::default();
    for i in 0..n {
        let full = i % 10 < 3;
        let free = if saturated && full && i % 50 != 0 {
            100
        } else {
            rng.random_range(2000..32768)
        };
        let w = advert(i, full, free, &mut rng);
        // Two in-flight streams of this gateway per worker, one newer than the advert.
        reservations.by_worker.insert(
            w.id.clone(),
            vec![
                Reservation {
                    kv_tokens: 700,
                    placed_unix_ms: 900,
                },
                Reservation {
                    kv_tokens: 700,
                    placed_unix_ms: 1100,
                },
            ],
        );
        snapshot.workers.insert(w.id.clone(), Arc::new(w));
    }
    snapshot.revision = 1;
    (snapshot, reservations)
}

/// Mean microseconds per call of `f`, run for about `budget`.
fn time(budget: Duration, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut calls = 0u64;
    while started.elapsed() < budget || calls < 10 {
        f();
        calls += 1;
    }
    started.elapsed().as_secs_f64() * 1e6 / calls as f64
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("SCHED_COST_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    println!(
        "| workers | preferred pool | class | full scan µs | sampled (k=4) µs | prefix-aware (k=4, 3 hits) µs | index rebuild µs | reservations clone µs |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    for n in [100, 1_000, 10_000] {
        for saturated in [false, true] {
            let (snapshot, reservations) = cluster(n, saturated);
            let rebuild = time(budget / 4, || {
                black_box(PoolIndex::build(&snapshot));
            });
            let clone = time(budget / 4, || {
                black_box(reservations.clone());
            });
            for class in [LatencyClass::Interactive, LatencyClass::Batch] {
                let demand = Demand {
                    model: "gpt-oss-20b",
                    class,
                    prompt_tokens: 600,
                    max_tokens: 256,
                    needs: Default::default(),
                };
                let mut cost = [0.0; 2];
                for (slot, sampling) in [Sampling::FullScan, Sampling::default()]
                    .into_iter()
                    .enumerate()
                {
                    let policy = Policy {
                        sampling,
                        ..Policy::default()
                    };
                    let mut rng = StdRng::seed_from_u64(7);
                    let exclude = HashSet::new();
                    cost[slot] = time(budget, || {
                        let r = scheduler::rank(
                            &demand,
                            &snapshot,
                            &reservations,
                            &exclude,
                            &policy,
                            &mut rng,
                        );
                        black_box(r.expect("a placement"));
                    });
                }
                // The live path: three workers of the preferred pool hold 512 of the 600
                // prompt tokens (some of them usually unsampled), ties by the prefix key.
                let pool_of = |i: usize| i % 10 < 3;
                let want_full = class == LatencyClass::Interactive;
                let hits = PrefixHits {
                    cached_tokens: (0..n)
                        .filter(|&i| pool_of(i) == want_full)
                        .step_by(7)
                        .take(3)
                        .map(|i| (format!("worker-{i:05}"), 512))
                        .collect(),
                    key: Some(42),
                };
                let policy = Policy::default();
                let mut rng = StdRng::seed_from_u64(7);
                let exclude = HashSet::new();
                let prefix = time(budget, || {
                    let r = affinity::rank_with_hits(
                        &demand,
                        &hits,
                        &snapshot,
                        &reservations,
                        &exclude,
                        (&policy, Affinity::default()),
                        &mut rng,
                    );
                    black_box(r.expect("a placement"));
                });
                println!(
                    "| {n} | {} | {} | {:.1} | {:.2} | {prefix:.2} | {rebuild:.0} | {clone:.0} |",
                    if saturated {
                        "1 full worker in 50 has room"
                    } else {
                        "room everywhere"
                    },
                    class.as_str(),
                    cost[0],
                    cost[1],
                );
            }
        }
    }
}
