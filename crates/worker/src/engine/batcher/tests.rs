//! Unit tests of the batcher state machine: admission, queueing and step planning here; slot
//! choice, prefix reuse and copies, eviction and aligned chunks in `cache`.

use super::*;

mod cache;

fn config() -> BatcherConfig {
    BatcherConfig {
        max_sequences: 2,
        cache_streams: 0,
        kv_tokens: 100,
        slot_kv_tokens: None,
        step_tokens: 16,
        aligned_prefill: None,
        batch_prefill_tokens_under_interactive: 4,
        interactive_reserved_sequences: 0,
        max_queue: 3,
        queue_timeout: Duration::from_secs(5),
        compact_streams: false,
    }
}

fn pending(
    n_prompt: usize,
    max_tokens: u32,
    class: LatencyClass,
    tag: u32,
    at: Instant,
) -> Pending<u32> {
    Pending {
        tokens: (0..n_prompt as u32).collect(),
        max_tokens,
        class,
        enqueued: at,
        payload: tag,
    }
}

/// Runs a plan as the engine would, sampling token 7 for every sampled entry.
fn step(b: &mut Batcher<u32>, now: Instant) -> Plan {
    let plan = b.plan(now);
    b.commit(&plan);
    for e in plan.entries.iter().filter(|e| e.sample) {
        if b.push_token(e.slot, 7) {
            b.finish(e.slot);
        }
    }
    plan
}

fn request(tokens: Vec<u32>, max_tokens: u32, tag: u32, at: Instant) -> Pending<u32> {
    Pending {
        tokens,
        max_tokens,
        class: LatencyClass::Interactive,
        enqueued: at,
        payload: tag,
    }
}

#[test]
fn batch_work_leaves_the_interactive_reserve_free() {
    let mut b = Batcher::new(BatcherConfig {
        max_sequences: 4,
        interactive_reserved_sequences: 1,
        max_queue: 10,
        ..config()
    });
    let t = Instant::now();
    for i in 0..4 {
        b.enqueue(pending(2, 10, LatencyClass::Batch, i, t))
            .unwrap();
    }
    let plan = step(&mut b, t);
    assert_eq!(
        plan.admitted.len(),
        3,
        "one slot stays free for interactive work"
    );
    assert_eq!(b.queued(), 1);
    b.enqueue(pending(2, 5, LatencyClass::Interactive, 9, t))
        .unwrap();
    let plan = step(&mut b, t);
    assert_eq!(
        plan.admitted.len(),
        1,
        "interactive takes the reserved slot at once"
    );
    let slot = plan.admitted[0].0;
    assert_eq!(b.seq_mut(slot).unwrap().class, LatencyClass::Interactive);
}

#[test]
fn batch_work_leaves_the_interactive_share_of_the_kv_cache() {
    let mut b = Batcher::new(BatcherConfig {
        max_sequences: 4,
        kv_tokens: 100,
        slot_kv_tokens: None,
        interactive_reserved_sequences: 1,
        max_queue: 10,
        ..config()
    });
    let t = Instant::now();
    // 25 cells are the interactive share: a batch request for 80 must wait.
    b.enqueue(pending(40, 40, LatencyClass::Batch, 1, t))
        .unwrap();
    assert!(step(&mut b, t).admitted.is_empty());
    b.enqueue(pending(40, 40, LatencyClass::Interactive, 2, t))
        .unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted.len(), 1, "interactive work may use the share");
    let slot = plan.admitted[0].0;
    assert_eq!(b.seq_mut(slot).unwrap().class, LatencyClass::Interactive);
    assert_eq!(b.queued(), 1, "the batch request still waits");
}

#[test]
fn admits_new_requests_between_decode_steps() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(4, 5, LatencyClass::Interactive, 1, t))
        .unwrap();
    let first = step(&mut b, t);
    assert_eq!(first.admitted, vec![(0, 0)]);
    assert_eq!(first.n_tokens(), 4);
    // A second request arrives while the first decodes: admitted at the very next step,
    // which carries the first one's decode token and the second one's prompt together.
    // (Tokens unlike the first prompt's, which it would have copied from the running stream.)
    b.enqueue(request(vec![100, 101, 102], 5, 2, t)).unwrap();
    let second = step(&mut b, t);
    assert_eq!(second.admitted, vec![(1, 0)]);
    assert_eq!(second.entries.len(), 2);
    assert_eq!(second.entries[0].tokens, vec![7]);
    assert_eq!(second.entries[0].pos, 4);
    assert_eq!(second.entries[1].tokens, vec![100, 101, 102]);
}

#[test]
fn frees_the_slot_and_kv_of_a_cancelled_request() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(10, 40, LatencyClass::Interactive, 1, t))
        .unwrap();
    step(&mut b, t);
    assert_eq!(b.free_kv_tokens(), 50);
    let gone = b.slots_where(|s| s.payload == 1);
    assert_eq!(gone, vec![0]);
    let seq = b.finish(0).unwrap();
    assert_eq!(seq.payload, 1);
    assert_eq!(b.free_kv_tokens(), 100);
    assert!(b.is_idle());
    assert!(b.plan(t).entries.is_empty());
}

#[test]
fn respects_the_prefill_budget_with_chunks() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(40, 5, LatencyClass::Interactive, 1, t))
        .unwrap();
    let sizes: Vec<_> = (0..3)
        .map(|_| step(&mut b, t))
        .map(|p| p.n_tokens())
        .collect();
    assert_eq!(sizes, vec![16, 16, 8]);
    // Only the last chunk samples.
    assert_eq!(b.seq(0).unwrap().generated, 1);
}

#[test]
fn batch_prefill_is_capped_while_interactive_streams_decode() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(2, 10, LatencyClass::Interactive, 1, t))
        .unwrap();
    step(&mut b, t); // interactive prefilled, now decoding
    b.enqueue(pending(30, 5, LatencyClass::Batch, 2, t))
        .unwrap();
    let plan = step(&mut b, t);
    assert_eq!(
        plan.entries[0].tokens.len(),
        1,
        "interactive decode is in every step"
    );
    assert_eq!(plan.entries[1].tokens.len(), 4, "batch chunk capped");
}

#[test]
fn interactive_requests_are_admitted_before_batch_ones() {
    let t = Instant::now();
    let mut b = Batcher::new(BatcherConfig {
        max_sequences: 1,
        ..config()
    });
    b.enqueue(pending(2, 2, LatencyClass::Batch, 1, t)).unwrap();
    b.enqueue(pending(2, 2, LatencyClass::Interactive, 2, t))
        .unwrap();
    step(&mut b, t);
    assert_eq!(b.seq(0).unwrap().payload, 2);
}

#[test]
fn refuses_what_can_never_fit_and_waits_for_what_does_not_fit_now() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    let (why, _) = b
        .enqueue(pending(90, 20, LatencyClass::Batch, 1, t))
        .unwrap_err();
    assert_eq!(
        why,
        Refusal::TooLong {
            needed: 110,
            capacity: 100
        }
    );
    b.enqueue(pending(30, 40, LatencyClass::Batch, 2, t))
        .unwrap();
    b.enqueue(pending(20, 20, LatencyClass::Batch, 3, t))
        .unwrap();
    step(&mut b, t);
    // 70 reserved, 30 free: the second (needs 40) must wait although a slot is free.
    assert_eq!(b.active(), 1);
    assert_eq!(b.queued(), 1);
    assert_eq!(b.free_kv_tokens(), 30);
    assert_eq!(
        b.unclaimed_kv_tokens(),
        0,
        "the queued request claims the rest"
    );
    // It times out in the queue rather than over-committing the KV cache.
    let expired = b.expire(t + Duration::from_secs(6));
    assert_eq!(expired.len(), 1);
    assert!(matches!(expired[0].0, Refusal::QueueTimeout { .. }));
    assert_eq!(expired[0].1.payload, 3);
}

#[test]
fn a_request_older_than_the_queue_timeout_that_fits_is_admitted_before_expiry() {
    // The engine takes requests between steps: one that arrived during a step longer than the
    // queue timeout is first offered admission (plan), then what is still queued expires.
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(10, 4, LatencyClass::Interactive, 1, t))
        .unwrap();
    let later = t + Duration::from_secs(6);
    let plan = b.plan(later);
    assert_eq!(plan.admitted.len(), 1, "a free slot takes it");
    assert!(b.expire(later).is_empty());
}

#[test]
fn a_full_queue_refuses_at_once() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    for i in 0..3 {
        b.enqueue(pending(1, 1, LatencyClass::Batch, i, t)).unwrap();
    }
    let (why, p) = b
        .enqueue(pending(1, 1, LatencyClass::Batch, 9, t))
        .unwrap_err();
    assert_eq!(why, Refusal::QueueFull { limit: 3 });
    assert_eq!(p.payload, 9);
}

#[test]
fn finishes_at_max_tokens() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(2, 3, LatencyClass::Interactive, 1, t))
        .unwrap();
    for _ in 0..3 {
        step(&mut b, t);
    }
    assert!(
        b.is_idle(),
        "three sampled tokens end a max_tokens=3 sequence"
    );
}

fn per_slot_config() -> BatcherConfig {
    BatcherConfig {
        max_sequences: 2,
        kv_tokens: 100,
        slot_kv_tokens: Some(50),
        ..config()
    }
}

#[test]
fn with_per_slot_streams_a_request_must_fit_its_slot() {
    let t = Instant::now();
    let mut b = Batcher::new(per_slot_config());
    let (why, _) = b
        .enqueue(pending(20, 40, LatencyClass::Interactive, 1, t))
        .expect_err("60 cells do not fit a 50-cell slot");
    assert_eq!(
        why,
        Refusal::TooLong {
            needed: 60,
            capacity: 50
        }
    );
    b.enqueue(pending(10, 40, LatencyClass::Interactive, 2, t))
        .expect("50 cells fit");
}

#[test]
fn with_per_slot_streams_a_slot_is_reserved_and_claimed_whole() {
    let t = Instant::now();
    let mut b = Batcher::new(per_slot_config());
    b.enqueue(pending(2, 3, LatencyClass::Interactive, 1, t))
        .unwrap();
    assert_eq!(
        b.unclaimed_kv_tokens(),
        50,
        "a queued request claims a slot"
    );
    b.plan(t);
    assert_eq!(b.free_kv_tokens(), 50, "the admitted one holds its slot");
    b.enqueue(pending(2, 3, LatencyClass::Interactive, 2, t))
        .unwrap();
    b.enqueue(pending(2, 3, LatencyClass::Interactive, 3, t))
        .unwrap();
    assert_eq!(b.unclaimed_kv_tokens(), 0);
}

#[test]
fn sequential_mode_prefills_an_interactive_prompt_first_and_whole_in_one_step() {
    let t = Instant::now();
    let mut b = Batcher::new(BatcherConfig {
        max_sequences: 3,
        kv_tokens: 200,
        aligned_prefill: Some(8),
        step_tokens: 8,
        max_queue: 10,
        ..config()
    });
    // A BATCH request decoding, another BATCH one prefilling one aligned chunk per step.
    b.enqueue(pending(3, 50, LatencyClass::Batch, 1, t))
        .unwrap();
    step(&mut b, t);
    b.enqueue(pending(30, 5, LatencyClass::Batch, 2, t))
        .unwrap();
    let plan = step(&mut b, t);
    let batch_chunks: Vec<_> = plan.entries.iter().filter(|e| e.tokens.len() > 1).collect();
    assert_eq!(batch_chunks.len(), 1, "BATCH prefills one chunk per step");
    // An INTERACTIVE prompt of 21 tokens: its three aligned chunks come first, in order, in
    // the step that admits it, the last one sampled; the decode and the BATCH chunk follow.
    b.enqueue(pending(21, 5, LatencyClass::Interactive, 3, t))
        .unwrap();
    let plan = step(&mut b, t);
    let (slot, _) = plan.admitted[0];
    let head: Vec<_> = plan.entries[..3]
        .iter()
        .map(|e| (e.slot, e.pos, e.tokens.len(), e.sample))
        .collect();
    assert_eq!(
        head,
        vec![
            (slot, 0, 8, false),
            (slot, 8, 8, false),
            (slot, 16, 5, true)
        ]
    );
    assert!(plan.entries[3..].iter().all(|e| e.slot != slot));
    // The BATCH decode still runs; its prompt's next chunk waits for the step's budget.
    assert_eq!(plan.entries.len(), 4);
    assert_eq!(b.seq(slot).map(|s| s.n_past), Some(21));
    let plan = step(&mut b, t);
    assert!(
        plan.entries
            .iter()
            .any(|e| e.tokens.len() == 8 && e.pos == 8)
    );
}

/// Three running sequences on streams 0, 1, 2 of `streams` (per-sequence streams, compaction as
/// configured); the one on stream 1 then finishes after its 2 tokens, the others run on.
fn gap_in_the_middle(streams: u32, compact: bool) -> Batcher<u32> {
    let t = Instant::now();
    let mut b = Batcher::new(BatcherConfig {
        max_sequences: 3,
        cache_streams: streams - 3,
        kv_tokens: 50 * streams,
        slot_kv_tokens: Some(50),
        max_queue: 10,
        compact_streams: compact,
        ..config()
    });
    for (tag, max_tokens) in [(1, 20), (2, 2), (3, 20)] {
        b.enqueue(pending(2, max_tokens, LatencyClass::Interactive, tag, t))
            .unwrap();
    }
    step(&mut b, t);
    let running = |b: &Batcher<u32>| -> Vec<(usize, u32)> {
        (0..streams as usize)
            .filter_map(|i| b.seq(i).map(|s| (i, s.payload)))
            .collect()
    };
    assert_eq!(running(&b), vec![(0, 1), (1, 2), (2, 3)]);
    step(&mut b, t);
    assert_eq!(
        running(&b),
        vec![(0, 1), (2, 3)],
        "the 2-token one finished"
    );
    b
}

#[test]
fn compaction_moves_the_highest_running_sequence_into_a_gap_keeping_the_gap_cache() {
    let t = Instant::now();
    let mut b = gap_in_the_middle(4, true);
    let cached = b.cached_sequences();
    let plan = b.plan(t);
    // Stream 1's cache (the finished sequence) goes to the empty stream 3, then the sequence of
    // stream 2 to stream 1.
    assert_eq!(
        plan.moves,
        vec![StreamMove { from: 1, to: 3 }, StreamMove { from: 2, to: 1 }]
    );
    assert!(plan.evicted.is_empty(), "stream 3 was empty");
    let moved = b.seq(1).expect("the moved sequence");
    assert_eq!((moved.payload, moved.seq_id), (3, 1));
    assert!(b.seq(2).is_none());
    let mut slots: Vec<(usize, i32)> = plan.entries.iter().map(|e| (e.slot, e.seq_id)).collect();
    slots.sort();
    assert_eq!(
        slots,
        vec![(0, 0), (1, 1)],
        "the step decodes streams 0 and 1"
    );
    let mut after = b.cached_sequences();
    let mut before = cached;
    after.sort();
    before.sort();
    assert_eq!(
        after, before,
        "every cached and running sequence is still held"
    );
    // Consecutive now: the next plans move nothing.
    b.commit(&plan);
    assert!(b.plan(t).moves.is_empty());
}

#[test]
fn compaction_keeps_a_gap_whose_cache_has_nowhere_to_go_and_is_off_unless_configured() {
    let t = Instant::now();
    // Three streams, all in the running range: the finished sequence's cache stays, and so
    // does the gap.
    let mut b = gap_in_the_middle(3, true);
    assert!(b.plan(t).moves.is_empty());
    // Once that cache is gone the running sequence moves into the empty stream.
    let mut b = gap_in_the_middle(3, true);
    b.forget(1);
    let plan = b.plan(t);
    assert_eq!(plan.moves, vec![StreamMove { from: 2, to: 1 }]);
    assert_eq!(b.seq(1).map(|s| s.payload), Some(3));
    // Not configured (sequential decode, or one unified stream): nothing moves.
    let mut b = gap_in_the_middle(4, false);
    assert!(b.plan(t).moves.is_empty());
    assert_eq!(b.seq(2).map(|s| s.payload), Some(3));
}

#[test]
fn compaction_takes_the_least_recently_used_idle_stream_for_the_gap_cache() {
    let t = Instant::now();
    let mut b = gap_in_the_middle(5, true);
    // Streams 3 and 4 take two short requests of other prompts (no prefix shared with the
    // cache of stream 1) that finish: both hold caches, 3 the older.
    for tag in [4, 5] {
        b.enqueue(request(vec![50 + tag, 60 + tag, 70 + tag], 1, tag, t))
            .unwrap();
        step(&mut b, t);
    }
    let plan = b.plan(t);
    let older = (3..5)
        .find(|&i| !plan.moves.iter().any(|m| m.to == i) && b.seq(i).is_none())
        .expect("one of the two cached streams keeps its cache");
    let evicted: Vec<usize> = plan.evicted.clone();
    assert_eq!(plan.moves.len(), 2, "{plan:?}");
    assert_eq!(plan.moves[1], StreamMove { from: 2, to: 1 });
    assert_eq!(evicted, vec![plan.moves[0].to], "the LRU cache made room");
    assert_ne!(older, plan.moves[0].to);
}
