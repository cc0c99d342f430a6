//! Waiting instead of refusing (issue 16) and skew-proof reservations (review M14).

use super::*;
use crate::scheduler::queue::{or_wait, rank_queued};

fn busy(id: &str, profile: &str, active: u32, queued: u32) -> WorkerAdvert {
    let mut w = worker(id, profile, 0);
    w.load = Load { active, queued };
    w
}

fn ranked(d: &Demand, s: &ClusterSnapshot) -> Result<Ranking, ScheduleError> {
    or_wait(
        rank_default(d, s),
        d,
        s,
        &Reservations::default(),
        &HashSet::new(),
        &Policy::default(),
    )
}

#[test]
fn no_headroom_anywhere_waits_where_fewest_are_ahead() {
    let s = snapshot(vec![
        busy("a", "full", 8, 6),
        busy("b", "full", 8, 1),
        busy("c", "cpu-moe", 8, 0),
    ]);
    let d = demand(LatencyClass::Interactive);
    assert!(matches!(
        rank_default(&d, &s),
        Err(ScheduleError::NoHeadroom { .. })
    ));
    let r = ranked(&d, &s).expect("waits rather than being refused");
    assert!(r.queued);
    // Its own pool first (fewest waiting first), then the other pool (spill is on).
    assert_eq!(ids(&r), vec!["b", "a", "c"]);
    let (_, decision) = pick(r, false).unwrap();
    assert_eq!(decision, Decision::Queued);
}

#[test]
fn a_worker_with_room_is_still_preferred_to_any_queue() {
    let s = snapshot(vec![busy("a", "full", 8, 0), worker("b", "full", 4000)]);
    let r = ranked(&demand(LatencyClass::Interactive), &s).unwrap();
    assert!(!r.queued);
    assert_eq!(ids(&r), vec!["b"]);
}

#[test]
fn batch_waits_in_its_own_pool_rather_than_spill_against_the_rule() {
    // The fast worker has room but is half loaded (batch spill is below:0.5); the offload
    // worker is full: batch waits on the offload worker, the fast one stays the retry fallback.
    let mut fast = worker("fast", "full", 4000);
    fast.load = Load {
        active: 4,
        queued: 0,
    };
    let s = snapshot(vec![fast, busy("slow", "cpu-moe", 8, 2)]);
    let r = ranked(&demand(LatencyClass::Batch), &s).unwrap();
    assert!(r.queued);
    assert_eq!(ids(&r), vec!["slow"]);
    assert_eq!(r.fallback[0].worker.id, "fast");
    // With no worker of its own pool at all, batch waits on the other pool instead of failing...
    let s = snapshot(vec![busy("fast", "full", 8, 3)]);
    let r = ranked(&demand(LatencyClass::Batch), &s).unwrap();
    assert_eq!(ids(&r), vec!["fast"]);
    // ...unless its spill rule is off: then only a retry may go there.
    let off = Policy {
        batch_spill: Spill::Off,
        ..Policy::default()
    };
    let d = demand(LatencyClass::Batch);
    let r = rank_queued(&d, &s, &Reservations::default(), &HashSet::new(), &off).unwrap();
    assert!(r.candidates.is_empty());
    assert_eq!(r.fallback[0].worker.id, "fast");
    assert!(pick(r.clone(), false).is_none());
    assert_eq!(pick(r, true).unwrap().0.worker.id, "fast");
}

#[test]
fn only_a_context_too_small_everywhere_is_refused_and_as_out_of_range() {
    let s = snapshot(vec![busy("a", "full", 8, 0)]);
    let huge = Demand {
        prompt_tokens: 9000,
        ..demand(LatencyClass::Interactive)
    };
    assert_eq!(
        ranked(&huge, &s).unwrap_err(),
        ScheduleError::PromptTooLong {
            needed: 9100,
            largest: 8192
        }
    );
    // Tried everywhere: the original "no headroom" error, not a queue.
    let tried: HashSet<String> = ["a".to_string()].into();
    let d = demand(LatencyClass::Interactive);
    assert!(matches!(
        rank_queued(&d, &s, &Reservations::default(), &tried, &Policy::default()),
        Err(ScheduleError::Unavailable(_))
    ));
}

/// The same placements judged against adverts whose stamps run `skew_ms` ahead of (or behind)
/// this gateway's clock: receipts make the outcome independent of the skew.
fn counted_with_skew(skew_ms: i64) -> Vec<(u32, u32)> {
    let gateway_now: u64 = 1_000_000_000;
    let stamp = (gateway_now as i64 + skew_ms) as u64;
    let mut res = Reservations::default();
    // Received at gateway_now.
    res.advert_received("w", stamp, gateway_now);
    // A repeat of the same advert later does not move its receipt.
    res.advert_received("w", stamp, gateway_now + 5_000);
    let mut out = Vec::new();
    for placed in [
        // Long before the advert arrived: reflected in it.
        gateway_now - 5_000,
        // Just before it arrived: the advert's numbers may predate it (ADVERT_LAG_MS).
        gateway_now - 100,
        // After it arrived: certainly not in it.
        gateway_now + 100,
    ] {
        res.by_worker.insert(
            "w".into(),
            vec![Reservation {
                kv_tokens: 300,
                placed_unix_ms: placed,
            }],
        );
        out.push(res.since("w", stamp));
    }
    out
}

#[test]
fn reservations_are_weighed_on_the_gateway_clock_whatever_the_worker_clock_says() {
    let expected = vec![(0, 0), (300, 1), (300, 1)];
    // A worker clock ten minutes ahead would have hidden every placement; ten minutes behind
    // would have counted placements its advert already reflects.
    for skew in [0, 600_000, -600_000, 1, -1] {
        assert_eq!(counted_with_skew(skew), expected, "skew {skew} ms");
    }
}

#[test]
fn a_new_advert_moves_the_receipt_and_an_unseen_one_counts_from_its_stamp() {
    let mut res = Reservations::default();
    res.by_worker.insert(
        "w".into(),
        vec![Reservation {
            kv_tokens: 300,
            placed_unix_ms: 10_000,
        }],
    );
    res.advert_received("w", 7, 9_000);
    assert_eq!(res.since("w", 7), (300, 1));
    res.advert_received("w", 8, 11_000);
    assert_eq!(res.since("w", 8), (0, 0), "the newer advert reflects it");
    // An advert this gateway has no receipt for (a caller that records none): its stamp.
    assert_eq!(res.since("w", 9_999), (300, 1));
    assert_eq!(res.since("w", 10_001), (0, 0));
    res.retain_received(|_| false);
    assert!(res.received.is_empty());
}

#[test]
fn expected_wait_is_the_shortest_queue_and_grows_with_it() {
    use crate::scheduler::queue::expected_wait;
    use std::time::Duration;
    let d = demand(LatencyClass::Interactive);
    let wait = |workers: Vec<WorkerAdvert>| {
        expected_wait(
            &d,
            &snapshot(workers),
            &Reservations::default(),
            &Policy::default(),
        )
    };
    // 8 slots all busy at 250 tokens/s: a sequence frees after ~64 tokens; 8 more waiting.
    let short = wait(vec![busy("a", "full", 8, 0)]).unwrap();
    let long = wait(vec![busy("a", "full", 8, 8)]).unwrap();
    assert!(short < Duration::from_millis(300), "{short:?}");
    assert!(long > short * 4, "{long:?} vs {short:?}");
    // The request would go where it waits least; an idle worker means no wait.
    let idle = wait(vec![busy("a", "full", 8, 8), worker("b", "cpu-moe", 4000)]).unwrap();
    assert!(idle < Duration::from_millis(50), "{idle:?}");
    // Its own prefill is not waiting: a longer prompt does not change the wait.
    let big = Demand {
        prompt_tokens: 4000,
        ..d.clone()
    };
    let s = snapshot(vec![busy("a", "full", 8, 8)]);
    let policy = Policy::default();
    assert_eq!(
        expected_wait(&big, &s, &Reservations::default(), &policy),
        Some(long)
    );
    // This gateway's own placements since the advert queue ahead of it too.
    let mut res = Reservations::default();
    res.by_worker.insert(
        "a".into(),
        vec![
            Reservation {
                kv_tokens: 10,
                placed_unix_ms: 2000,
            };
            8
        ],
    );
    assert!(expected_wait(&d, &s, &res, &policy).unwrap() > long);
    // Nobody could take it: no estimate.
    let mut draining = busy("a", "full", 0, 0);
    draining.state = WorkerState::Draining;
    assert_eq!(wait(vec![draining]), None);
}
