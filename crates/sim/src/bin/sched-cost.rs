//! `moe-sched-cost`: wall-clock cost of one placement decision (`scheduler::rank`) at 100, 1,000
//! and 10,000 workers, the full scan (the policy before issue 17) next to sampled power-of-k, in
//! one run, and the live prefix-aware decision (`scheduler::affinity::rank_with_hits`, sampled,
//! with three workers holding part of the prompt). Also times an index rebuild, a room index
//! build (the per-snapshot list a saturated pool's decisions read), a clone of the reservations
//! (what the router did per decision) and the prefix index lookup that comes before a
//! prefix-aware decision (`PrefixIndex::hits`), next to the scan of every worker it replaced.
//! A third table times the lookup and the decision for a prompt starting with a system prompt
//! every worker holds, next to the decision on what the index returned for it before (every
//! worker listed). About 40 seconds in all; prints three markdown tables
//! (`SCHED_COST_ONLY=system-prompt`: the third alone).

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_common::LatencyClass;
use moe_common::pb::PrefixCacheEvent;
use moe_common::prefix::{BLOCK_TOKENS, cached_blocks};
use moe_common::registry::{
    ADVERT_SCHEMA, Capacity, ClusterSnapshot, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed,
    WorkerAdvert, WorkerState,
};
use moe_gateway::prefix_index::PrefixIndex;
use moe_gateway::scheduler::affinity::{self, Affinity};
use moe_gateway::scheduler::{
    self, Demand, Policy, Pool, PoolIndex, PrefixHits, Reservation, Reservations, RoomIndex,
    Sampling,
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
        decode_mode: None,
        batch_invariant: None,
        system_fingerprint: None,
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

/// Conversations each worker's prefix cache holds, and their length in blocks.
const CONVERSATIONS: u64 = 4;
const CONVERSATION_BLOCKS: u64 = 24;
/// Blocks of a system prompt every worker holds.
const SYSTEM_BLOCKS: u64 = 4;

/// Block hash `b` of conversation `c` (distinct for every (c, b); the system prompt is c = 0).
fn block(c: u64, b: u64) -> u64 {
    affinity::stable_hash(&[c.to_le_bytes(), b.to_le_bytes()].concat())
}

/// The prefix caches of `n` workers: each holds the system prompt and 4 conversations of its
/// own of 24 blocks; the request's conversation (1) is held whole by one worker, half by
/// another and a quarter by a third. Returns the index and the same caches as the scan of
/// every worker (what `PrefixIndex::hits` did before) read them.
fn caches(n: usize, max_blocks: u64) -> (PrefixIndex, HashMap<String, (String, HashSet<u64>)>) {
    let index = PrefixIndex::default();
    let mut scan = HashMap::new();
    for i in 0..n {
        let id = format!("worker-{i:05}");
        let mut blocks: Vec<u64> = (0..SYSTEM_BLOCKS).map(|b| block(0, b)).collect();
        for c in 0..CONVERSATIONS {
            let c = 2 + i as u64 * CONVERSATIONS + c;
            blocks.extend((0..CONVERSATION_BLOCKS).map(|b| block(c, b)));
        }
        let held = match i {
            0 => max_blocks,
            7 => max_blocks / 2,
            14 => max_blocks / 4,
            _ => 0,
        };
        blocks.extend((0..held).map(|b| block(1, b)));
        scan.insert(
            id.clone(),
            ("fp".to_string(), blocks.iter().copied().collect()),
        );
        index.apply(
            &id,
            PrefixCacheEvent {
                snapshot: true,
                stored: blocks,
                removed: vec![],
                block_tokens: BLOCK_TOKENS,
                model_fingerprint: "fp".into(),
            },
        );
    }
    (index, scan)
}

/// The lookup before issue 17's inverted index: one probe per block per worker.
fn scan_hits(
    workers: &HashMap<String, (String, HashSet<u64>)>,
    fingerprint: &str,
    blocks: &[u64],
    prompt_tokens: u32,
) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for (id, (fp, held)) in workers {
        if fp != fingerprint {
            continue;
        }
        let n = cached_blocks(blocks, |h| held.contains(&h));
        if n > 0 {
            out.insert(id.clone(), (n as u32 * BLOCK_TOKENS).min(prompt_tokens));
        }
    }
    out
}

/// A prompt of `blocks` blocks of conversation 1, after the system prompt when `system`.
fn prompt(blocks: u64, system: bool) -> Vec<u64> {
    let system = if system { SYSTEM_BLOCKS } else { 0 };
    (0..system)
        .map(|b| block(0, b))
        .chain((0..blocks - system).map(|b| block(1, b)))
        .collect()
}

/// Mean microseconds per call of `f`, run for about `budget`.
/// What every decision here places: 600 prompt + 256 generated tokens of one model.
fn demand(class: LatencyClass) -> Demand<'static> {
    Demand {
        model: "gpt-oss-20b",
        class,
        prompt_tokens: 600,
        max_tokens: 256,
        needs: Default::default(),
        batch_invariant: false,
    }
}

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
    if std::env::var("SCHED_COST_ONLY").is_ok_and(|v| v == "system-prompt") {
        system_prompt_decisions(budget);
        return;
    }
    // The prefix index lookup: a 20-block prompt held by three workers.
    let mut lookup_20 = HashMap::new();
    let mut lookups = Vec::new();
    for n in [100, 1_000, 10_000] {
        let (index, scan) = caches(n, 40);
        for blocks in [10, 20, 40] {
            for system in [false, true] {
                let p = prompt(blocks, system);
                let tokens = blocks as u32 * BLOCK_TOKENS;
                let new = index.hits("fp", &p, tokens, Some(42));
                let old = scan_hits(&scan, "fp", &p, tokens);
                for id in scan.keys() {
                    assert_eq!(
                        new.cached(id),
                        old.get(id).copied().unwrap_or(0),
                        "the inverted index and the scan disagree on {id}"
                    );
                }
                let inverted = time(budget / 4, || {
                    black_box(index.hits("fp", &p, tokens, Some(42)));
                });
                if blocks == 20 && !system {
                    lookup_20.insert(n, inverted);
                }
                if n == 100 || blocks == 20 {
                    continue;
                }
                let scanned = time(budget / 4, || {
                    black_box(scan_hits(&scan, "fp", &p, tokens));
                });
                let shared = new.shared.as_ref().map_or(0, |s| s.shared_tokens());
                let listed = new.cached_tokens.len();
                lookups.push((
                    n,
                    blocks,
                    system,
                    old.len(),
                    listed,
                    shared,
                    scanned,
                    inverted,
                ));
            }
        }
    }
    println!(
        "| workers | preferred pool | class | full scan µs | sampled (k=4) µs | prefix-aware (k=4, 3 hits) µs | prefix lookup (20 blocks) µs | index rebuild µs | room index build µs | reservations clone µs |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for n in [100, 1_000, 10_000] {
        for saturated in [false, true] {
            let (snapshot, reservations) = cluster(n, saturated);
            let rebuild = time(budget / 4, || {
                black_box(PoolIndex::build(&snapshot));
            });
            let rooms = time(budget / 4, || {
                // What an interactive decision whose samples missed builds (856 tokens).
                let r = RoomIndex::build(&snapshot, "gpt-oss-20b", Pool::Fast, 856 / 2);
                black_box(r.len());
            });
            let clone = time(budget / 4, || {
                black_box(reservations.clone());
            });
            for class in [LatencyClass::Interactive, LatencyClass::Batch] {
                let demand = demand(class);
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
                    shared: None,
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
                    "| {n} | {} | {} | {:.1} | {:.2} | {prefix:.2} | {:.2} | {rebuild:.0} | {rooms:.0} | {clone:.0} |",
                    if saturated {
                        "1 full worker in 50 has room"
                    } else {
                        "room everywhere"
                    },
                    class.as_str(),
                    cost[0],
                    cost[1],
                    lookup_20[&n],
                );
            }
        }
    }
    println!();
    println!(
        "| workers | prompt blocks | shared | workers with a hit | listed by the index | shared run tokens | scan of every worker µs | inverted index µs |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for (n, blocks, system, with_hit, listed, shared, scanned, inverted) in lookups {
        println!(
            "| {n} | {blocks} | {} | {with_hit} | {listed} | {shared} | {scanned:.1} | {inverted:.2} |",
            if system {
                "4-block system prompt on every worker + conversation on 3"
            } else {
                "conversation on 3 workers"
            },
        );
    }
    println!();
    system_prompt_decisions(budget);
}

/// The live prefix-aware decision for a prompt starting with the 4-block system prompt every
/// worker holds (18 blocks, 576 of 600 prompt tokens; the conversation after it held by workers
/// 0, 7 and 14): the lookup, the lookup and the decision on its answer, and the decision on the
/// answer the index gave before (every worker listed, each evaluated).
fn system_prompt_decisions(budget: Duration) {
    println!(
        "| workers | preferred pool | class | workers with a hit | listed | lookup µs | unlisted worker read µs | decision µs | lookup + decision µs | decision, every worker listed (before) µs |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for n in [1_000, 10_000] {
        let (index, scan) = caches(n, 40);
        let p = prompt(18, true);
        let lookup = time(budget / 4, || {
            black_box(index.hits("fp", &p, 600, Some(42)));
        });
        let every = PrefixHits {
            cached_tokens: scan_hits(&scan, "fp", &p, 600),
            key: Some(42),
            shared: None,
        };
        let listed = index.hits("fp", &p, 600, Some(42)).cached_tokens.len();
        // What scoring a worker the index did not list costs (its hit read from the index).
        let hits = index.hits("fp", &p, 600, Some(42));
        let ids: Vec<String> = (0..n).map(|i| format!("worker-{i:05}")).collect();
        let mut next = 0;
        let read = time(budget / 4, || {
            next = (next + 7919) % n;
            assert_eq!(
                black_box(hits.cached(&ids[next])),
                if next == 0 || next == 7 {
                    576
                } else if next == 14 {
                    448
                } else {
                    128
                }
            );
        });
        for saturated in [false, true] {
            let (snapshot, reservations) = cluster(n, saturated);
            for class in [LatencyClass::Interactive, LatencyClass::Batch] {
                let demand = demand(class);
                let policy = Policy::default();
                let exclude = HashSet::new();
                let decide = |hits: &PrefixHits, rng: &mut StdRng| {
                    affinity::rank_with_hits(
                        &demand,
                        hits,
                        &snapshot,
                        &reservations,
                        &exclude,
                        (&policy, Affinity::default()),
                        rng,
                    )
                    .expect("a placement")
                };
                let hits = index.hits("fp", &p, 600, Some(42));
                let mut rng = StdRng::seed_from_u64(7);
                let decision = time(budget, || {
                    black_box(decide(&hits, &mut rng));
                });
                let mut rng = StdRng::seed_from_u64(7);
                let after = time(budget, || {
                    let hits = index.hits("fp", &p, 600, Some(42));
                    black_box(decide(&hits, &mut rng));
                });
                let mut rng = StdRng::seed_from_u64(7);
                let before = time(budget, || {
                    black_box(decide(&every, &mut rng));
                });
                println!(
                    "| {n} | {} | {} | {} | {listed} | {lookup:.2} | {read:.3} | {decision:.2} | {after:.2} | {before:.1} |",
                    if saturated {
                        "1 full worker in 50 has room"
                    } else {
                        "room everywhere"
                    },
                    class.as_str(),
                    every.cached_tokens.len(),
                );
            }
        }
    }
}
