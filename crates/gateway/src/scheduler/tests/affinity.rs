//! Behaviour tests of prefix affinity (issue 17).

use super::*;
use crate::scheduler::affinity::{
    Affinity, load_with_local, prefix_key, prefix_score, rank_with_prefix, rendezvous_top,
    within_bound,
};

#[test]
fn prefix_score_counts_leading_cached_blocks() {
    let cached: HashSet<u64> = [1, 2, 3, 9].into();
    assert_eq!(prefix_score(&[1, 2, 3, 4, 9], &cached), 3);
    assert_eq!(prefix_score(&[5, 1], &cached), 0);
    assert_eq!(prefix_score(&[], &cached), 0);
}

#[test]
fn rendezvous_is_stable_and_moves_only_the_keys_of_a_removed_worker() {
    let hashes: Vec<u64> = (0..50)
        .map(|i| crate::scheduler::affinity::stable_hash(format!("w{i}").as_bytes()))
        .collect();
    let mut moved = 0;
    for key in 0..1000u64 {
        let top = rendezvous_top(key, &hashes, 2);
        assert_eq!(top, rendezvous_top(key, &hashes, 2));
        // Drop worker 7: keys whose first choice was 7 move to their second, others stay.
        let without: Vec<u64> = hashes.iter().copied().filter(|&h| h != hashes[7]).collect();
        let after = rendezvous_top(key, &without, 1)[0];
        let after = hashes.iter().position(|&h| h == without[after]).unwrap();
        if top[0] == 7 {
            assert_eq!(after, top[1]);
            moved += 1;
        } else {
            assert_eq!(after, top[0]);
        }
    }
    assert!((5..60).contains(&moved), "{moved} keys were on worker 7");
}

#[test]
fn prefix_key_is_the_conversation_start() {
    use moe_common::pb::ChatMessage;
    let msg = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    };
    let turn1 = GenerateRequest {
        messages: vec![msg("system", "be brief"), msg("user", "hello")],
        ..Default::default()
    };
    let mut turn2 = turn1.clone();
    turn2
        .messages
        .extend([msg("assistant", "hi"), msg("user", "more")]);
    let other = GenerateRequest {
        messages: vec![msg("system", "be brief"), msg("user", "bye")],
        ..Default::default()
    };
    assert_eq!(prefix_key(&turn1), prefix_key(&turn2));
    assert_ne!(prefix_key(&turn1), prefix_key(&other));
    assert_eq!(prefix_key(&GenerateRequest::default()), None);
}

fn affine(s: &ClusterSnapshot, res: &Reservations, key: u64, d: &Demand) -> Ranking {
    rank_with_prefix(
        d,
        Some(key),
        s,
        res,
        &HashSet::new(),
        (&full_scan(), Affinity::default()),
        &mut StdRng::seed_from_u64(key),
    )
    .unwrap()
}

/// Each worker's load counting this gateway's reservations, and their mean.
fn loads_and_mean(s: &ClusterSnapshot, res: &Reservations) -> (Vec<f64>, f64) {
    let loads: Vec<f64> = s
        .workers
        .values()
        .map(|w| load_with_local(w, res))
        .collect();
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    (loads, mean)
}

#[test]
fn two_gateways_pick_the_same_worker_for_a_prefix() {
    let s = fleet(8, 8);
    for key in 0..50 {
        let a = rank_with_prefix(
            &demand(LatencyClass::Interactive),
            Some(key),
            &s,
            &Reservations::default(),
            &HashSet::new(),
            (&Policy::default(), Affinity::default()),
            &mut StdRng::seed_from_u64(1),
        )
        .unwrap();
        let b = affine(
            &s,
            &Reservations::default(),
            key,
            &demand(LatencyClass::Interactive),
        );
        assert_eq!(a.candidates[0].worker.id, b.candidates[0].worker.id);
        assert!(!a.candidates[0].spill);
    }
}

#[test]
fn affinity_never_overrides_headroom_or_class() {
    let key = 42;
    let s = fleet(8, 8);
    let d = demand(LatencyClass::Interactive);
    let chosen = affine(&s, &Reservations::default(), key, &d).candidates[0]
        .worker
        .id
        .clone();
    // The preferred worker loses its headroom: someone else, still in the fast pool.
    let ws: Vec<WorkerAdvert> = s
        .workers
        .values()
        .map(|w| {
            let mut w = (**w).clone();
            if w.id == chosen {
                w.capacity.free_kv_tokens = 10;
            }
            w
        })
        .collect();
    let r = affine(&snapshot(ws), &Reservations::default(), key, &d);
    assert_ne!(r.candidates[0].worker.id, chosen);
    assert!(!r.candidates[0].spill);
    // Batch requests with the same key stay in the offload pool.
    let b = affine(
        &s,
        &Reservations::default(),
        key,
        &demand(LatencyClass::Batch),
    );
    assert_eq!(b.candidates[0].pool, Pool::Offload);
}

#[test]
fn a_hot_prefix_does_not_push_a_worker_beyond_the_load_bound() {
    // One key for every request, placed through one gateway whose reservations count.
    let s = fleet(8, 0);
    let d = demand(LatencyClass::Interactive);
    let mut res = Reservations::default();
    let eps = Affinity::default().epsilon;
    for _ in 0..48 {
        let r = affine(&s, &res, 7, &d);
        place(&mut res, &r.candidates[0].worker.id, 1, 2000);
        let (loads, mean) = loads_and_mean(&s, &res);
        let max = loads.iter().cloned().fold(0.0, f64::max);
        // One placement past the bound at most (the check precedes the placement).
        assert!(
            within_bound(max, mean, eps, 2.0 / 8.0),
            "max load {max} vs mean {mean}"
        );
    }
    // The key's first choice got more than its share, but not all of it.
    let most = res.by_worker.values().map(Vec::len).max().unwrap();
    assert!((7..48).contains(&most), "{most}");
}

#[test]
fn a_worker_holding_the_prompt_wins_even_when_sampling_misses_it() {
    // 40 workers: first placements sample 4 of them.
    let s = fleet(40, 0);
    let d = Demand {
        prompt_tokens: 2000,
        ..demand(LatencyClass::Interactive)
    };
    let h = prefix_hits(&[("f0017", 1984)], 5);
    for seed in 0..30 {
        let r = with_hits(&s, &Reservations::default(), &h, &d, seed);
        assert_eq!(r.candidates[0].worker.id, "f0017", "seed {seed}");
    }
}

#[test]
fn gateways_break_ties_alike_by_the_prefix_key() {
    let s = fleet(8, 0);
    let d = demand(LatencyClass::Interactive);
    let mut firsts = HashSet::new();
    for key in 0..40 {
        let h = prefix_hits(&[], key);
        // Two gateways: different random sources, same events.
        let a = with_hits(&s, &Reservations::default(), &h, &d, 1);
        let b = with_hits(&s, &Reservations::default(), &h, &d, 2);
        assert_eq!(a.candidates[0].worker.id, b.candidates[0].worker.id);
        firsts.insert(a.candidates[0].worker.id.clone());
    }
    assert!(firsts.len() >= 5, "keys spread over workers: {firsts:?}");
}

#[test]
fn a_hot_cached_prefix_fills_its_workers_slots_then_spreads_within_the_load_bound() {
    let s = fleet(4, 0);
    let d = Demand {
        prompt_tokens: 2000,
        ..demand(LatencyClass::Interactive)
    };
    let h = prefix_hits(&[("f0000", 1984)], 3);
    let mut res = Reservations::default();
    let eps = Affinity::default().epsilon;
    for i in 0..12 {
        let r = with_hits(&s, &res, &h, &d, i);
        place(&mut res, &r.candidates[0].worker.id, 1, 2000);
        let (_, mean) = loads_and_mean(&s, &res);
        let hot = load_with_local(&s.workers["f0000"], &res);
        // Its 8 slots, then no further than the bound (the check precedes the placement).
        assert!(
            hot <= 1.0 || within_bound(hot, mean, eps, 2.0 / 8.0),
            "{hot} vs {mean}"
        );
    }
    let on_hot = res.by_worker.get("f0000").map_or(0, Vec::len);
    assert_eq!(on_hot, 8, "the hot worker's slots, then the others");
}

#[test]
fn batch_prefers_a_hit_among_workers_with_headroom_only() {
    let d = demand(LatencyClass::Batch);
    let h = prefix_hits(&[("hit", 64)], 1);
    let s = snapshot(vec![
        worker("roomy", "cpu-moe", 8000),
        worker("hit", "cpu-moe", 3000),
    ]);
    assert_eq!(
        ids(&with_hits(&s, &Reservations::default(), &h, &d, 1)),
        ["hit", "roomy"]
    );
    // No headroom for prompt + max_tokens (200): not a candidate, hit or not.
    let s = snapshot(vec![
        worker("roomy", "cpu-moe", 8000),
        worker("hit", "cpu-moe", 150),
    ]);
    assert_eq!(
        ids(&with_hits(&s, &Reservations::default(), &h, &d, 1)),
        ["roomy"]
    );
}

#[test]
fn interactive_counts_only_uncached_tokens_as_prefill() {
    // A slower worker holding most of a long prompt beats a faster one holding none.
    let mut slow = worker("slow", "full", 8000);
    slow.speed.prefill_tokens_per_second = 2500.0;
    let s = snapshot(vec![worker("fast", "full", 8000), slow]);
    let d = Demand {
        prompt_tokens: 4000,
        ..demand(LatencyClass::Interactive)
    };
    let none = prefix_hits(&[], 9);
    assert_eq!(
        with_hits(&s, &Reservations::default(), &none, &d, 1).candidates[0]
            .worker
            .id,
        "fast"
    );
    let h = prefix_hits(&[("slow", 3968)], 9);
    assert_eq!(
        with_hits(&s, &Reservations::default(), &h, &d, 1).candidates[0]
            .worker
            .id,
        "slow"
    );
}

#[test]
fn a_just_started_worker_is_assumed_as_fast_as_its_peers() {
    // The restarted worker has measured nothing: with the policy's default speeds it would look
    // faster than a peer holding most of the prompt.
    let mut fresh = worker("fresh", "full", 8000);
    fresh.speed.prefill_tokens_per_second = 0.0;
    fresh.speed.decode_tokens_per_second = 0.0;
    let mut holder = worker("holder", "full", 8000);
    holder.speed.prefill_tokens_per_second = 50.0;
    let s = snapshot(vec![holder, fresh]);
    let d = Demand {
        prompt_tokens: 300,
        ..demand(LatencyClass::Interactive)
    };
    let h = prefix_hits(&[("holder", 256)], 4);
    let r = with_hits(&s, &Reservations::default(), &h, &d, 1);
    assert_eq!(r.candidates[0].worker.id, "holder");
}

#[test]
fn a_shared_system_prompt_alone_does_not_fill_one_worker() {
    // Every request holds only a 64-token system prompt of a 300-token prompt on f0000: it
    // counts within the load bound only, so new conversations spread.
    let s = fleet(3, 0);
    let d = Demand {
        prompt_tokens: 300,
        ..demand(LatencyClass::Interactive)
    };
    let h = prefix_hits(&[("f0000", 64)], 3);
    let mut res = Reservations::default();
    for i in 0..6 {
        let r = with_hits(&s, &res, &h, &d, i);
        place(&mut res, &r.candidates[0].worker.id, 1, 2000);
    }
    let on_hot = res.by_worker.get("f0000").map_or(0, Vec::len);
    assert!(
        on_hot < 6,
        "{on_hot} of 6 on the worker with the system prompt"
    );
}

#[test]
fn a_system_prompt_every_worker_holds_is_not_a_reason_to_evaluate_every_worker() {
    use crate::prefix_index::PrefixIndex;
    use moe_common::pb::PrefixCacheEvent;
    // 200 workers hold a 4-block system prompt (blocks 100..104); f0017 also holds the
    // conversation after it (blocks 0..12); f0003 restarted and holds nothing.
    let s = fleet(200, 0);
    let index = PrefixIndex::default();
    for i in 0..200u64 {
        let mut stored: Vec<u64> = (100..104).collect();
        if i == 17 {
            stored.extend(0..12);
        }
        if i == 3 {
            stored.clear();
        }
        index.apply(
            &format!("f{i:04}"),
            PrefixCacheEvent {
                snapshot: true,
                stored,
                removed: vec![],
                block_tokens: moe_common::prefix::BLOCK_TOKENS,
                model_fingerprint: "fp".into(),
            },
        );
    }
    let prompt: Vec<u64> = (100..104).chain(0..12).collect();
    let d = Demand {
        prompt_tokens: 520,
        ..demand(LatencyClass::Interactive)
    };
    let hits = index.hits("fp", &prompt, 520, Some(11));
    assert_eq!(
        hits.cached_tokens,
        [("f0017".to_string(), 512)].into_iter().collect(),
        "only the worker holding more than the system prompt is listed"
    );
    assert_eq!((hits.cached("f0005"), hits.cached("f0003")), (128, 0));
    // What the index answered before: every worker holding part of the prompt, listed.
    let every = PrefixHits {
        cached_tokens: (0..200)
            .filter(|&i| i != 3)
            .map(|i| (format!("f{i:04}"), if i == 17 { 512 } else { 128 }))
            .collect(),
        key: Some(11),
        ..PrefixHits::default()
    };
    for seed in 0..20 {
        let r = with_hits(&s, &Reservations::default(), &hits, &d, seed);
        let before = with_hits(&s, &Reservations::default(), &every, &d, seed);
        assert_eq!(r.candidates[0].worker.id, "f0017", "seed {seed}");
        assert_eq!(before.candidates[0].worker.id, "f0017");
        assert!(
            before.candidates.len() >= 199,
            "every hit worker evaluated before"
        );
        assert!(r.candidates.len() <= 1 + 4 * 5, "{}", r.candidates.len());
        // The sampled workers are scored with the system prompt they hold, as before.
        for c in &r.candidates {
            let was = before
                .candidates
                .iter()
                .find(|b| b.worker.id == c.worker.id);
            match was {
                Some(b) => assert!((b.score - c.score).abs() < 1e-9, "{}", c.worker.id),
                None => assert_eq!(c.worker.id, "f0003"),
            }
        }
    }
}
