//! The per-snapshot index of workers' advertised free KV that a sampled decision reads when
//! no sample fits ([`super::super::sampled::RoomIndex`]).

use super::*;

/// `n` full workers of which those `roomy` returns true for have room; 10 offloaded.
fn saturated(n: usize, roomy: impl Fn(usize) -> bool) -> ClusterSnapshot {
    let mut ws: Vec<WorkerAdvert> = (0..n)
        .map(|i| {
            worker(
                &format!("f{i:04}"),
                "full",
                if roomy(i) { 8000 } else { 10 },
            )
        })
        .collect();
    ws.extend((0..10).map(|i| worker(&format!("o{i:04}"), "cpu-moe", 8000)));
    snapshot(ws)
}

/// An INTERACTIVE decision with the default policy.
fn interactive(s: &ClusterSnapshot, reservations: &Reservations, seed: u64) -> Ranking {
    rank(
        &demand(LatencyClass::Interactive),
        s,
        reservations,
        &HashSet::new(),
        &Policy::default(),
        &mut StdRng::seed_from_u64(seed),
    )
    .unwrap()
}

/// This gateway's placements since the adverts: 7900 KV tokens on each of `ids`.
fn filled(ids: impl IntoIterator<Item = String>) -> Reservations {
    let mut reservations = Reservations::default();
    for id in ids {
        reservations.by_worker.insert(
            id,
            vec![Reservation {
                kv_tokens: 7900,
                placed_unix_ms: 2000,
            }],
        );
    }
    reservations
}

fn first(s: &ClusterSnapshot, seed: u64) -> String {
    let r = interactive(s, &Reservations::default(), seed);
    assert!(!r.candidates[0].spill, "a full worker has room");
    r.candidates[0].worker.id.clone()
}

#[test]
fn room_index_lists_the_pools_workers_advertising_room() {
    let mut ws = vec![
        worker("a", "full", 100),
        worker("b", "full", 5000),
        worker("c", "cpu-moe", 300),
        worker("d", "full", 300),
        worker("e", "full", 5000),
    ];
    let mut other = worker("x", "full", 9000);
    other.model.name = "other".into();
    ws.push(other);
    let s = snapshot(ws);
    let index = RoomIndex::build(&s, "m", Pool::Fast, 150);
    let names =
        |needed: u32| -> Vec<String> { index.with_room(needed).map(|w| w.id.clone()).collect() };
    assert_eq!(
        index.len(),
        3,
        "another model's, the other pool's and a small one left out"
    );
    assert_eq!(names(300), ["b", "d", "e"], "snapshot order");
    assert_eq!(names(301), ["b", "e"]);
    assert!(names(9000).is_empty());
    assert!(index.covers(Pool::Fast, 150) && !index.covers(Pool::Fast, 149));
    assert!(!index.covers(Pool::Offload, 300));
    let offload = RoomIndex::build(&s, "m", Pool::Offload, 0);
    assert_eq!(
        offload
            .with_room(0)
            .map(|w| w.id.as_str())
            .collect::<Vec<_>>(),
        ["c"]
    );
    assert_eq!(
        RoomIndex::build(&s, "", Pool::Fast, 0).len(),
        5,
        "every model"
    );
}

#[test]
fn the_room_index_is_built_again_for_a_smaller_demand() {
    // Built for 200 tokens (floor 100): a demand for 100 reuses it, one for 60 does not and
    // still finds the worker advertising 80.
    let s = saturated(500, |i| i == 137);
    let mut ws: Vec<WorkerAdvert> = s.workers.values().map(|w| (**w).clone()).collect();
    ws.iter_mut()
        .filter(|w| w.id == "f0400")
        .for_each(|w| w.capacity.free_kv_tokens = 80);
    let s = snapshot(ws);
    let policy = Policy::default();
    let index = |needed: u32| {
        policy
            .index
            .rooms(&s, ("m", Features::NONE, false), Pool::Fast, needed)
    };
    let first = index(200);
    assert!(Arc::ptr_eq(&first, &index(100)), "reused");
    let smaller = index(60);
    assert!(!Arc::ptr_eq(&first, &smaller));
    let ids: Vec<&str> = smaller.with_room(60).map(|w| w.id.as_str()).collect();
    assert_eq!(ids, ["f0137", "f0400"]);
}

#[test]
fn a_saturated_pool_samples_the_workers_with_room_and_only_those() {
    // 1 full worker in 50 has room: samples of the pool mostly miss, and the decision samples
    // the workers with room instead.
    let s = saturated(2000, |i| i % 50 == 7);
    let roomy: HashSet<String> = (0..2000)
        .filter(|i| i % 50 == 7)
        .map(|i| format!("f{i:04}"))
        .collect();
    let mut chosen = HashSet::new();
    for seed in 0..200 {
        let r = interactive(&s, &Reservations::default(), seed);
        let got: HashSet<String> = r.candidates.iter().map(|c| c.worker.id.clone()).collect();
        assert!(
            got.is_subset(&roomy),
            "seed {seed}: a worker without room offered"
        );
        assert!(
            got.len() <= 20,
            "seed {seed}: a sample, not every worker with room"
        );
        chosen.insert(r.candidates[0].worker.id.clone());
    }
    assert!(
        chosen.len() > 20,
        "spread over the workers with room: {}",
        chosen.len()
    );
}

#[test]
fn when_this_gateways_placements_took_the_advertised_room_every_listed_worker_is_tried() {
    // 40 full workers advertise room, but this gateway has since filled all of them but one:
    // the samples of the workers with room miss, and the one left is still found, not a spill.
    let s = saturated(2000, |i| i % 50 == 7);
    let reservations = filled(
        (0..2000)
            .filter(|i| i % 50 == 7 && *i != 1007)
            .map(|i| format!("f{i:04}")),
    );
    for seed in 0..20 {
        let r = interactive(&s, &reservations, seed);
        assert_eq!(ids(&r)[0], "f1007", "seed {seed}");
        assert!(!r.candidates[0].spill);
    }
}

#[test]
fn the_room_index_follows_a_new_snapshot() {
    let s1 = saturated(500, |i| i == 137);
    assert_eq!(first(&s1, 1), "f0137");
    // A new snapshot (same revision and size, other adverts): f0137 full, f0042 has room.
    let s2 = saturated(500, |i| i == 42);
    for seed in 0..10 {
        assert_eq!(first(&s2, seed), "f0042");
    }
    // Changed in place, as the simulator does, with the revision bumped: f0042 full again.
    let mut s3 = s2.clone();
    s3.workers
        .insert("f0042".into(), Arc::new(worker("f0042", "full", 10)));
    s3.workers
        .insert("f0300".into(), Arc::new(worker("f0300", "full", 8000)));
    s3.revision += 1;
    for seed in 0..10 {
        assert_eq!(first(&s3, seed), "f0300");
    }
    // The worker with room leaves: nothing in the pool fits, the full scan spills.
    let mut s4 = s3.clone();
    s4.workers.remove("f0300");
    s4.revision += 1;
    let r = rank_default(&demand(LatencyClass::Interactive), &s4).unwrap();
    assert!(r.candidates[0].spill);
    let r = interactive(&s4, &Reservations::default(), 3);
    assert!(r.candidates.iter().all(|c| c.worker.id != "f0300"));
    assert!(r.candidates[0].spill);
    // Back to the first snapshot: its index is rebuilt, not mixed up with the others.
    assert_eq!(first(&s1, 2), "f0137");
}

#[test]
fn reservations_since_the_advert_still_count_against_the_room_index() {
    // The advert says f0137 has room, but this gateway has since placed enough to fill it:
    // the index lists it, the headroom check on the decision's reservations refuses it.
    let s = saturated(500, |i| i == 137 || i == 300);
    let reservations = filled(["f0137".to_string()]);
    for seed in 0..20 {
        let r = interactive(&s, &reservations, seed);
        assert_eq!(ids(&r), ["f0300"], "seed {seed}");
    }
}
