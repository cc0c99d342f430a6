//! Behaviour tests of the placement policy.

use super::*;
use crate::scheduler::affinity::{Affinity, rank_with_hits};
use moe_common::registry::{
    ADVERT_SCHEMA, Capacity, Feature, Features, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed,
    WorkerState,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn worker(id: &str, profile: &str, free_kv: u32) -> WorkerAdvert {
    let n_cpu_moe = match profile {
        "full" => 0,
        "cpu-moe" => 24,
        p => p.trim_start_matches("n-cpu-moe:").parse().unwrap(),
    };
    WorkerAdvert {
        schema: ADVERT_SCHEMA,
        id: id.into(),
        endpoint: format!("http://127.0.0.1:{}", 50000 + id.len()),
        state: WorkerState::Ready,
        model: ModelInfo {
            name: "m".into(),
            n_layer: 24,
            ..Default::default()
        },
        model_fingerprint: String::new(),
        decode_mode: None,
        batch_invariant: None,
        system_fingerprint: None,
        features: Features::all(),
        offload: OffloadInfo {
            mode: profile.split(':').next().unwrap().into(),
            n_cpu_moe,
            profile: profile.into(),
        },
        devices: vec![],
        memory: MemoryInfo::default(),
        capacity: Capacity {
            context_tokens: 8192,
            free_kv_tokens: free_kv,
            max_sequences: 8,
        },
        load: Load::default(),
        speed: Speed {
            decode_tokens_per_second: if profile == "full" { 250.0 } else { 25.0 },
            prefill_tokens_per_second: if profile == "full" { 5000.0 } else { 1000.0 },
        },
        version: "t".into(),
        updated_unix_ms: 1000,
    }
}

fn snapshot(workers: Vec<WorkerAdvert>) -> ClusterSnapshot {
    ClusterSnapshot {
        revision: 1,
        workers: workers
            .into_iter()
            .map(|w| (w.id.clone(), Arc::new(w)))
            .collect(),
        rejected: Default::default(),
    }
}

fn demand(class: LatencyClass) -> Demand<'static> {
    Demand {
        model: "m",
        class,
        prompt_tokens: 100,
        max_tokens: 100,
        needs: Features::NONE,
        batch_invariant: false,
    }
}

fn ids(r: &Ranking) -> Vec<&str> {
    r.candidates.iter().map(|c| c.worker.id.as_str()).collect()
}

/// [`rank`] with no reservations and no worker excluded.
fn rank_with(
    d: &Demand,
    s: &ClusterSnapshot,
    policy: &Policy,
    rng: &mut StdRng,
) -> Result<Ranking, ScheduleError> {
    rank(d, s, &Reservations::default(), &HashSet::new(), policy, rng)
}

fn rank_default(d: &Demand, s: &ClusterSnapshot) -> Result<Ranking, ScheduleError> {
    rank_with(d, s, &Policy::default(), &mut StdRng::seed_from_u64(7))
}

/// [`rank`] under the default policy with this gateway's reservations `res` and the random
/// source seeded with `seed`, nothing excluded.
fn rank_reserved(d: &Demand, s: &ClusterSnapshot, res: &Reservations, seed: u64) -> Ranking {
    rank(
        d,
        s,
        res,
        &HashSet::new(),
        &Policy::default(),
        &mut StdRng::seed_from_u64(seed),
    )
    .unwrap()
}

/// What a prefix index answers: `cached` tokens of the prompt on each listed worker, for the
/// prefix `key`.
fn prefix_hits(cached: &[(&str, u32)], key: u64) -> PrefixHits {
    PrefixHits {
        cached_tokens: cached.iter().map(|(w, t)| (w.to_string(), *t)).collect(),
        key: Some(key),
        ..PrefixHits::default()
    }
}

/// [`rank_with_hits`] under the default policy and affinity, nothing excluded.
fn with_hits(
    s: &ClusterSnapshot,
    res: &Reservations,
    hits: &PrefixHits,
    d: &Demand,
    seed: u64,
) -> Ranking {
    rank_with_hits(
        d,
        hits,
        s,
        res,
        &HashSet::new(),
        (&Policy::default(), Affinity::default()),
        &mut StdRng::seed_from_u64(seed),
    )
    .unwrap()
}

/// Records this gateway's placement of `kv_tokens` on `id` at `placed_unix_ms` (its clock).
fn place(res: &mut Reservations, id: &str, kv_tokens: u32, placed_unix_ms: u64) {
    res.by_worker
        .entry(id.into())
        .or_default()
        .push(Reservation {
            kv_tokens,
            placed_unix_ms,
        });
}

#[test]
fn interactive_prefers_full_gpu_worker() {
    let s = snapshot(vec![
        worker("slow", "cpu-moe", 8000),
        worker("fast", "full", 1000),
    ]);
    let r = rank_default(&demand(LatencyClass::Interactive), &s).unwrap();
    assert_eq!(ids(&r), vec!["fast", "slow"]);
    assert!(!r.candidates[0].spill);
    assert!(r.candidates[1].spill);
}

#[test]
fn batch_prefers_offloaded_workers_ranked_by_headroom() {
    let s = snapshot(vec![
        worker("fast", "full", 8000),
        worker("small", "cpu-moe", 1000),
        worker("big", "n-cpu-moe:12", 6000),
    ]);
    let r = rank_default(&demand(LatencyClass::Batch), &s).unwrap();
    assert_eq!(ids(&r)[..2], ["big", "small"]);
}

#[test]
fn interactive_ranks_by_predicted_time_to_first_token() {
    let mut busy = worker("busy", "full", 8000);
    busy.load = Load {
        active: 8,
        queued: 8,
    };
    let idle = worker("idle", "full", 8000);
    let s = snapshot(vec![busy, idle]);
    let r = rank_default(&demand(LatencyClass::Interactive), &s).unwrap();
    assert_eq!(ids(&r)[0], "idle");
    assert!(r.candidates[0].score < r.candidates[1].score);
}

#[test]
fn skips_worker_without_kv_headroom() {
    let s = snapshot(vec![
        worker("full-1", "full", 150),
        worker("full-2", "full", 500),
    ]);
    let r = rank_default(&demand(LatencyClass::Interactive), &s).unwrap();
    assert_eq!(ids(&r), vec!["full-2"]);
}

#[test]
fn subtracts_reservations_made_since_the_advert() {
    let s = snapshot(vec![worker("a", "full", 500), worker("b", "full", 400)]);
    let mut res = Reservations::default();
    // A placement newer than a's advert: a has 500 - 350 = 150 left, below the 200 needed.
    place(&mut res, "a", 350, 2000);
    // An old placement on b, already reflected in b's advert: not subtracted again.
    place(&mut res, "b", 350, 10);
    let r = rank_reserved(&demand(LatencyClass::Interactive), &s, &res, 1);
    assert_eq!(ids(&r), vec!["b"]);
}

#[test]
fn spill_off_keeps_batch_out_of_the_fast_pool_but_offers_it_as_fallback() {
    let s = snapshot(vec![
        worker("fast", "full", 8000),
        worker("slow", "cpu-moe", 100),
    ]);
    let policy = Policy {
        batch_spill: Spill::Off,
        ..Policy::default()
    };
    let r = rank_with(
        &demand(LatencyClass::Batch),
        &s,
        &policy,
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap();
    assert!(r.candidates.is_empty());
    assert_eq!(r.fallback[0].worker.id, "fast");
}

#[test]
fn spill_below_load_uses_the_other_pool_only_while_it_is_lightly_loaded() {
    let mut fast = worker("fast", "full", 8000);
    let s_idle = snapshot(vec![fast.clone(), worker("slow", "cpu-moe", 100)]);
    let r = rank_default(&demand(LatencyClass::Batch), &s_idle).unwrap();
    assert_eq!(
        ids(&r),
        vec!["fast"],
        "default batch spill is below:0.5; idle fast pool qualifies"
    );
    fast.load = Load {
        active: 6,
        queued: 0,
    };
    let s_busy = snapshot(vec![fast, worker("slow", "cpu-moe", 100)]);
    let r = rank_default(&demand(LatencyClass::Batch), &s_busy).unwrap();
    assert!(r.candidates.is_empty());
    assert_eq!(r.fallback.len(), 1);
}

#[test]
fn spill_over_happens_when_the_preferred_pool_is_saturated() {
    let s = snapshot(vec![
        worker("fast", "full", 0),
        worker("slow", "cpu-moe", 8000),
    ]);
    let r = rank_default(&demand(LatencyClass::Interactive), &s).unwrap();
    assert_eq!(ids(&r), vec!["slow"]);
    assert!(r.candidates[0].spill);
}

#[test]
fn unknown_model_is_not_found() {
    let s = snapshot(vec![worker("a", "full", 8000)]);
    let d = Demand {
        model: "other",
        ..demand(LatencyClass::Interactive)
    };
    assert_eq!(
        rank_default(&d, &s).unwrap_err(),
        ScheduleError::ModelNotFound("other".into())
    );
}

#[test]
fn no_workers_is_unavailable_and_draining_workers_get_nothing() {
    let empty = snapshot(vec![]);
    let d = Demand {
        model: "",
        ..demand(LatencyClass::Interactive)
    };
    assert!(matches!(
        rank_default(&d, &empty),
        Err(ScheduleError::Unavailable(_))
    ));
    let mut w = worker("a", "full", 8000);
    w.state = WorkerState::Draining;
    assert!(matches!(
        rank_default(&demand(LatencyClass::Interactive), &snapshot(vec![w])),
        Err(ScheduleError::Unavailable(_))
    ));
}

#[test]
fn no_headroom_anywhere_is_resource_exhausted_with_the_reason() {
    let s = snapshot(vec![worker("a", "full", 10), worker("b", "cpu-moe", 10)]);
    assert!(matches!(
        rank_default(&demand(LatencyClass::Interactive), &s),
        Err(ScheduleError::NoHeadroom { needed: 200, .. })
    ));
    let long_prompt = Demand {
        prompt_tokens: 8150,
        ..demand(LatencyClass::Interactive)
    };
    let err = rank_default(&long_prompt, &s).unwrap_err();
    assert!(err.to_string().contains("context smaller"), "{err}");
}

#[test]
fn max_tokens_beyond_every_context_is_too_large() {
    let s = snapshot(vec![worker("a", "full", 8000)]);
    let huge = Demand {
        max_tokens: 100_000,
        ..demand(LatencyClass::Interactive)
    };
    assert_eq!(
        rank_default(&huge, &s).unwrap_err(),
        ScheduleError::TooLarge {
            max_tokens: 100_000,
            largest: 8192
        }
    );
}

#[test]
fn excluded_workers_are_not_candidates() {
    let s = snapshot(vec![worker("a", "full", 8000), worker("b", "full", 8000)]);
    let exclude: HashSet<String> = ["a".to_string()].into();
    let r = rank(
        &demand(LatencyClass::Interactive),
        &s,
        &Reservations::default(),
        &exclude,
        &Policy::default(),
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap();
    assert_eq!(ids(&r), vec!["b"]);
}

#[test]
fn ties_are_broken_by_two_choices_on_local_in_flight_streams() {
    let s = snapshot(vec![worker("a", "full", 8000), worker("b", "full", 8000)]);
    let mut res = Reservations::default();
    // Old placements (not subtracted from headroom) but still in flight locally on a.
    for _ in 0..3 {
        place(&mut res, "a", 1, 0);
    }
    for seed in 0..20 {
        let r = rank_reserved(&demand(LatencyClass::Interactive), &s, &res, seed);
        assert_eq!(ids(&r)[0], "b", "seed {seed}");
    }
}

#[test]
fn spill_parses_from_flags() {
    assert_eq!("on".parse::<Spill>(), Ok(Spill::On));
    assert_eq!("below:0.5".parse::<Spill>(), Ok(Spill::BelowLoad(0.5)));
    assert!("below:x".parse::<Spill>().is_err());
}

// --- Sampled decisions (issue 17) ---

fn fleet(n_full: usize, n_offload: usize) -> ClusterSnapshot {
    let mut ws: Vec<WorkerAdvert> = (0..n_full)
        .map(|i| worker(&format!("f{i:04}"), "full", 8000))
        .collect();
    ws.extend((0..n_offload).map(|i| worker(&format!("o{i:04}"), "cpu-moe", 8000)));
    snapshot(ws)
}

fn full_scan() -> Policy {
    Policy {
        sampling: Sampling::FullScan,
        ..Policy::default()
    }
}

#[test]
fn sampled_placement_stays_in_the_preferred_pool_with_headroom() {
    // 100 full workers, only every tenth has room; 100 offloaded with plenty.
    let mut ws: Vec<WorkerAdvert> = (0..100)
        .map(|i| {
            worker(
                &format!("f{i:04}"),
                "full",
                if i % 10 == 0 { 8000 } else { 50 },
            )
        })
        .collect();
    ws.extend((0..100).map(|i| worker(&format!("o{i:04}"), "cpu-moe", 8000)));
    let s = snapshot(ws);
    let policy = Policy::default();
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..200 {
        let r = rank_with(&demand(LatencyClass::Interactive), &s, &policy, &mut rng).unwrap();
        let first = &r.candidates[0];
        assert!(!first.spill, "a full worker with room exists");
        assert!(first.worker.capacity.free_kv_tokens >= 200);
    }
}

#[test]
fn sampled_placement_falls_back_to_the_full_scan_when_nothing_sampled_fits() {
    // One full worker with room among 200: samples almost never find it, the scan does.
    let mut ws: Vec<WorkerAdvert> = (0..200)
        .map(|i| {
            worker(
                &format!("f{i:04}"),
                "full",
                if i == 137 { 8000 } else { 10 },
            )
        })
        .collect();
    ws.push(worker("o", "cpu-moe", 8000));
    let s = snapshot(ws);
    let r = rank_reserved(
        &demand(LatencyClass::Interactive),
        &s,
        &Reservations::default(),
        5,
    );
    assert_eq!(ids(&r)[0], "f0137");
    // Nothing in the preferred pool: the scan's spill-over and its errors, as before.
    let none = fleet(0, 0);
    assert!(rank_default(&demand(LatencyClass::Interactive), &none).is_err());
}

#[test]
fn sampled_and_full_scan_agree_on_errors_and_spill() {
    let s = snapshot(
        (0..50)
            .map(|i| worker(&format!("f{i:04}"), "full", 0))
            .chain((0..50).map(|i| worker(&format!("o{i:04}"), "cpu-moe", 8000)))
            .collect(),
    );
    for policy in [Policy::default(), full_scan()] {
        let r = rank_with(
            &demand(LatencyClass::Interactive),
            &s,
            &policy,
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        assert!(r.candidates[0].spill, "{:?}", policy.sampling);
    }
}

#[test]
fn sampled_index_notices_a_worker_that_changed() {
    let s1 = fleet(40, 0);
    let policy = Policy::default();
    let mut rng = StdRng::seed_from_u64(9);
    let d = demand(LatencyClass::Interactive);
    rank_with(&d, &s1, &policy, &mut rng).unwrap();
    // Same size, every full worker replaced by a draining one and one new ready worker.
    let mut ws: Vec<WorkerAdvert> = (0..39)
        .map(|i| {
            let mut w = worker(&format!("f{i:04}"), "full", 8000);
            w.state = WorkerState::Draining;
            w
        })
        .collect();
    ws.push(worker("new", "full", 8000));
    let s2 = snapshot(ws);
    for _ in 0..20 {
        let r = rank_with(&d, &s2, &policy, &mut rng).unwrap();
        assert_eq!(ids(&r)[0], "new");
    }
}

#[test]
fn several_gateways_spread_first_placements_over_equal_workers() {
    let s = fleet(100, 0);
    let mut firsts = HashSet::new();
    for gateway in 0..4 {
        let r = rank_reserved(
            &demand(LatencyClass::Interactive),
            &s,
            &Reservations::default(),
            gateway,
        );
        firsts.insert(r.candidates[0].worker.id.clone());
    }
    assert!(firsts.len() >= 3, "4 gateways chose {firsts:?}");
}

mod affinity;
mod predictor;
mod queue;
mod rooms;

/// A worker from before the advert's `features` field: its JSON has no such key.
fn old_worker(id: &str, profile: &str) -> WorkerAdvert {
    let mut json = serde_json::to_value(worker(id, profile, 4000)).unwrap();
    json.as_object_mut().unwrap().remove("features");
    let key = format!("/moe/v1/workers/{id}");
    WorkerAdvert::from_json(&key, json.to_string().as_bytes()).unwrap()
}

fn needing(needs: Features) -> Demand<'static> {
    Demand {
        needs,
        ..demand(LatencyClass::Interactive)
    }
}

#[test]
fn adverts_without_features_have_none() {
    assert_eq!(old_worker("old", "full").features, Features::NONE);
}

#[test]
fn a_request_needing_a_feature_skips_workers_that_lack_it() {
    // The old worker is the better interactive choice (full GPU) but cannot serve tools.
    let s = Arc::new(snapshot(vec![
        old_worker("old", "full"),
        worker("new", "cpu-moe", 4000),
    ]));
    let tools = needing(Features::NONE.with(Feature::Tools));
    let capable = features::capable(s.clone(), &tools).unwrap();
    assert_eq!(ids(&rank_default(&tools, &capable).unwrap()), vec!["new"]);
    // A plain request still uses every worker, and the snapshot is not copied.
    let plain = needing(Features::NONE);
    let same = features::capable(s.clone(), &plain).unwrap();
    assert!(Arc::ptr_eq(&same, &s));
    assert_eq!(ids(&rank_default(&plain, &same).unwrap())[0], "old");
}

#[test]
fn no_worker_with_the_feature_is_unavailable_naming_it() {
    let s = Arc::new(snapshot(vec![
        old_worker("old-1", "full"),
        old_worker("old-2", "cpu-moe"),
    ]));
    let d = needing(
        Features::NONE
            .with(Feature::ChatTemplate)
            .with(Feature::Logprobs),
    );
    let err = features::capable(s, &d).unwrap_err();
    let ScheduleError::Unavailable(msg) = &err else {
        panic!("{err:?}");
    };
    assert!(msg.contains("chat_template, logprobs"), "{msg}");
    assert!(msg.contains("2 worker(s)"), "{msg}");
    assert!(msg.contains("model \"m\""), "{msg}");
}

#[test]
fn workers_of_other_models_do_not_hide_a_missing_feature() {
    let mut other = worker("other", "full", 4000);
    other.model.name = "other-model".into();
    let s = Arc::new(snapshot(vec![old_worker("old", "full"), other]));
    let d = needing(Features::NONE.with(Feature::JsonSchema));
    assert!(matches!(
        features::capable(s.clone(), &d),
        Err(ScheduleError::Unavailable(m)) if m.contains("json_schema")
    ));
    // An unknown model is still reported as such by the ranking.
    let unknown = Demand { model: "nope", ..d };
    let capable = features::capable(s, &unknown).unwrap();
    assert_eq!(
        rank_default(&unknown, &capable).unwrap_err(),
        ScheduleError::ModelNotFound("nope".into())
    );
}

fn invariance(mut w: WorkerAdvert, batch_invariant: Option<bool>) -> WorkerAdvert {
    w.batch_invariant = batch_invariant;
    w
}

fn requiring_invariance() -> Demand<'static> {
    Demand {
        batch_invariant: true,
        ..demand(LatencyClass::Interactive)
    }
}

/// The gateway's real placement path (`RoutingState`: feature and `batch_invariant` filter, then
/// the sampled or full ranking) over `s`.
fn routing(s: ClusterSnapshot) -> crate::router::RoutingState {
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(s));
    crate::router::RoutingState::new(rx, Policy::default())
}

#[test]
fn a_batch_invariant_request_goes_only_to_workers_advertising_it() {
    // The interactive favourites (full GPU) are not batch-invariant or do not say; the only
    // invariant worker is an offload one, reached by spill-over.
    let s = Arc::new(snapshot(vec![
        invariance(worker("variant", "full", 8000), Some(false)),
        invariance(worker("old", "full", 8000), None),
        invariance(worker("inv", "cpu-moe", 4000), Some(true)),
    ]));
    let d = requiring_invariance();
    let capable = features::capable(s.clone(), &d).unwrap();
    let r = rank_default(&d, &capable).unwrap();
    assert_eq!(ids(&r), ["inv"]);
    assert!(r.fallback.is_empty());
    // Without the field every worker is a candidate, and the snapshot is not copied.
    let plain = demand(LatencyClass::Interactive);
    let same = features::capable(s.clone(), &plain).unwrap();
    assert!(Arc::ptr_eq(&same, &s));
    assert_ne!(ids(&rank_default(&plain, &same).unwrap())[0], "inv");

    // Through the router, for first placements and retries: a retry that has tried the
    // invariant worker finds no other, rather than a non-invariant one.
    let router = routing(Arc::unwrap_or_clone(s));
    let first = router.rank(&d, &HashSet::new()).unwrap();
    assert_eq!(ids(&first), ["inv"]);
    let tried: HashSet<String> = ["inv".to_string()].into();
    match router.rank(&d, &tried) {
        Err(ScheduleError::Unavailable(_)) => {}
        other => panic!("a retry must not fall back to another worker: {other:?}"),
    }
    let plain_retry = router.rank(&plain, &tried).unwrap();
    assert!(!ids(&plain_retry).contains(&"inv"));
}

#[test]
fn sampled_placements_of_batch_invariant_requests_never_draw_other_workers() {
    // A pool large enough to be sampled (not scanned), one worker in ten invariant.
    let ws: Vec<WorkerAdvert> = (0..60)
        .map(|i| {
            let w = worker(&format!("f{i:04}"), "full", 8000);
            invariance(w, Some(i % 10 == 3))
        })
        .collect();
    let router = routing(snapshot(ws));
    let d = requiring_invariance();
    for _ in 0..200 {
        let r = router.rank(&d, &HashSet::new()).unwrap();
        for c in r.candidates.iter().chain(&r.fallback) {
            assert_eq!(c.worker.batch_invariant, Some(true), "{}", c.worker.id);
        }
        assert!(!r.candidates.is_empty());
    }
}

#[test]
fn no_batch_invariant_worker_is_a_failed_precondition_naming_the_field() {
    // A batch-invariant worker of another model does not count.
    let mut other = invariance(worker("other", "full", 8000), Some(true));
    other.model.name = "other-model".into();
    let s = Arc::new(snapshot(vec![
        invariance(worker("variant", "full", 8000), Some(false)),
        invariance(worker("old", "cpu-moe", 8000), None),
        other,
    ]));
    let err = features::capable(s.clone(), &requiring_invariance()).unwrap_err();
    assert!(
        matches!(err, ScheduleError::NotBatchInvariant { workers: 2, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with("batch_invariant: "), "{msg}");
    assert!(
        msg.contains("no worker serving model \"m\" guarantees batch-invariant output"),
        "{msg}"
    );
    let status = crate::proxy::schedule_status(err);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    // The router says the same.
    let router = routing(Arc::unwrap_or_clone(s));
    assert!(matches!(
        router.rank(&requiring_invariance(), &HashSet::new()),
        Err(ScheduleError::NotBatchInvariant { .. })
    ));
    // A model nobody serves is still reported as such.
    let unknown = Demand {
        model: "nope",
        ..requiring_invariance()
    };
    assert_eq!(
        router.rank(&unknown, &HashSet::new()).unwrap_err(),
        ScheduleError::ModelNotFound("nope".into())
    );
    // Workers lacking a feature the request needs are reported as that, not as variance.
    let s = Arc::new(snapshot(vec![invariance(
        old_worker("old", "full"),
        Some(true),
    )]));
    let d = Demand {
        needs: Features::NONE.with(Feature::Tools),
        ..requiring_invariance()
    };
    assert!(matches!(
        features::capable(s, &d),
        Err(ScheduleError::Unavailable(m)) if m.contains("tools")
    ));
}
