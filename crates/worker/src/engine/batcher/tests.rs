//! Unit tests of the batcher state machine.

use super::*;

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
fn reuses_the_longest_cached_prefix_and_skips_recomputing_it() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(10, 2, LatencyClass::Interactive, 1, t))
        .unwrap();
    b.enqueue(pending(3, 2, LatencyClass::Interactive, 2, t))
        .unwrap();
    while !b.is_idle() {
        step(&mut b, t);
    }
    // Slot 0 holds 0..10 plus one decoded token; slot 1 holds 0..3 plus one.
    assert_eq!(b.cached_tokens(), 11 + 4);
    let mut long = pending(12, 2, LatencyClass::Interactive, 3, t);
    long.tokens[11] = 99;
    b.enqueue(long).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(
        plan.admitted,
        vec![(0, 10)],
        "slot 0 shares 10 prompt tokens"
    );
    assert_eq!(plan.entries[0].pos, 10);
    assert_eq!(
        plan.entries[0].tokens,
        vec![10, 99],
        "only the new suffix is computed"
    );
    assert_eq!(b.seq(0).unwrap().reused, 10);
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(6, 2, LatencyClass::Interactive, 1, t))
        .unwrap();
    while !b.is_idle() {
        step(&mut b, t);
    }
    b.enqueue(pending(6, 2, LatencyClass::Interactive, 2, t))
        .unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(0, 5)]);
    assert_eq!(plan.entries[0].tokens, vec![5]);
    assert!(plan.entries[0].sample);
}

#[test]
fn evicts_least_recently_used_caches_only_when_an_admission_needs_the_room() {
    let t = Instant::now();
    let mut b = Batcher::new(BatcherConfig {
        max_sequences: 3,
        ..config()
    });
    for tag in 0..2 {
        let mut p = pending(30, 2, LatencyClass::Interactive, tag, t);
        p.tokens[0] = 100 + tag; // distinct prompts
        b.enqueue(p).unwrap();
        while !b.is_idle() {
            step(&mut b, t);
        }
    }
    assert_eq!(b.cached_tokens(), 62);
    assert_eq!(
        b.free_kv_tokens(),
        100,
        "caches are evictable: all cells advertised free"
    );
    // Needs 60 of 100 cells; 62 are cached in slots 0 and 1, slot 2 is empty: evict slot 0
    // (least recently used) and keep slot 1.
    let mut p = pending(50, 10, LatencyClass::Interactive, 9, t);
    p.tokens[0] = 7;
    b.enqueue(p).unwrap();
    let plan = b.plan(t);
    assert_eq!(plan.admitted, vec![(2, 0)]);
    assert_eq!(plan.evicted, vec![0]);
    assert_eq!(b.cached_tokens(), 31);
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
fn with_per_slot_streams_admission_never_evicts_another_slots_cache() {
    let t = Instant::now();
    let mut b = Batcher::new(per_slot_config());
    b.enqueue(pending(30, 1, LatencyClass::Interactive, 1, t))
        .unwrap();
    while b.active() > 0 || b.queued() > 0 {
        step(&mut b, t);
    }
    assert_eq!(b.cached_tokens(), 30);
    // A request as large as a slot: in one shared pool of 100 cells with 30 cached it would
    // evict; here it takes the other slot and leaves the cache alone.
    let other: Vec<u32> = (100..140).collect();
    b.enqueue(Pending {
        tokens: other,
        max_tokens: 10,
        class: LatencyClass::Interactive,
        enqueued: t,
        payload: 2,
    })
    .unwrap();
    let plan = b.plan(t);
    assert!(plan.evicted.is_empty(), "{plan:?}");
    assert_eq!(plan.admitted.len(), 1);
    assert_eq!(b.cached_tokens(), 30);
}

#[test]
fn a_dropped_reuse_prefills_the_whole_prompt_on_the_next_plan() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(10, 2, LatencyClass::Interactive, 1, t))
        .unwrap();
    while !b.is_idle() {
        step(&mut b, t);
    }
    b.enqueue(pending(12, 2, LatencyClass::Interactive, 2, t))
        .unwrap();
    let first = b.plan(t);
    assert_eq!(first.admitted, vec![(0, 10)]);
    // The engine finds the cached cells gone (a sliding window dropped them).
    b.drop_reuse(0);
    let again = b.plan(t);
    assert!(again.admitted.is_empty(), "admitted once");
    assert_eq!(again.entries[0].pos, 0);
    assert_eq!(again.entries[0].tokens.len(), 12, "the whole prompt");
    assert_eq!(b.seq(0).unwrap().reused, 0);
}

#[test]
fn without_a_window_reuse_needs_every_position_from_zero() {
    assert!(reuse_allowed(0, 40, 0));
    assert!(!reuse_allowed(3, 40, 0), "positions 0..3 are gone");
    assert!(!reuse_allowed(-1, 40, 0), "the slot holds nothing");
}

#[test]
fn with_a_window_reuse_needs_only_the_last_window_before_the_prefix_end() {
    // Window 128, 300 tokens reused: positions 172.. must be cached.
    assert!(reuse_allowed(150, 300, 128));
    assert!(reuse_allowed(172, 300, 128));
    assert!(!reuse_allowed(173, 300, 128), "position 172 was dropped");
    // Shorter than the window: everything from 0.
    assert!(reuse_allowed(0, 100, 128));
    assert!(!reuse_allowed(1, 100, 128));
}

#[test]
fn publishes_running_prompts_and_finished_sequences() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    let v0 = b.cache_version();
    assert!(b.cached_sequences().is_empty());
    b.enqueue(pending(5, 2, LatencyClass::Interactive, 1, t))
        .unwrap();
    step(&mut b, t);
    assert_ne!(b.cache_version(), v0, "admission changes the view");
    assert_eq!(b.cached_sequences(), vec![Arc::from(vec![0, 1, 2, 3, 4])]);
    let v1 = b.cache_version();
    step(&mut b, t); // decodes the first sampled token and finishes at max_tokens
    assert!(b.is_idle());
    assert_ne!(b.cache_version(), v1, "finishing changes the view");
    // The prompt and the one generated token fed back hold cells.
    assert_eq!(
        b.cached_sequences(),
        vec![Arc::from(vec![0, 1, 2, 3, 4, 7])]
    );
    let v2 = b.cache_version();
    b.forget(0);
    assert_ne!(b.cache_version(), v2);
    assert!(b.cached_sequences().is_empty());
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

fn run_to_idle(b: &mut Batcher<u32>, t: Instant) {
    while !b.is_idle() {
        step(b, t);
    }
}

/// Two 100-cell streams.
fn chat_config() -> BatcherConfig {
    BatcherConfig {
        kv_tokens: 200,
        slot_kv_tokens: Some(100),
        ..per_slot_config()
    }
}

/// A 20-token system prompt followed by a conversation's own 20 tokens.
fn chat(conversation: u32) -> Vec<u32> {
    (0..20)
        .chain((0..20).map(|i| 1000 * conversation + i))
        .collect()
}

#[test]
fn a_new_conversation_never_overwrites_a_longer_history_and_copies_the_shared_prefix() {
    let t = Instant::now();
    let mut b = Batcher::new(chat_config());
    b.enqueue(request(chat(1), 2, 1, t)).unwrap();
    run_to_idle(&mut b, t);
    // Conversation B shares only the system prompt with A's history in slot 0: it takes the
    // empty slot, with the system prompt copied there.
    b.enqueue(request(chat(2), 2, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(1, 20)], "{plan:?}");
    assert_eq!(
        plan.copies,
        vec![PrefixCopy {
            src: 0,
            dst: 1,
            len: 20
        }]
    );
    assert_eq!(
        plan.entries[0].pos, 20,
        "the system prompt is not recomputed"
    );
    run_to_idle(&mut b, t);
    // A's next turn finds its whole history where it left it.
    let a_history = chat(1).into_iter().chain([7]).collect::<Vec<_>>();
    let turn2: Vec<u32> = a_history.iter().copied().chain(500..520).collect();
    b.enqueue(request(turn2, 2, 3, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(0, a_history.len() as u32)]);
    assert!(plan.copies.is_empty());
}

#[test]
fn without_an_empty_stream_the_least_recently_used_is_taken_and_the_shared_prefix_copied() {
    let t = Instant::now();
    let mut b = Batcher::new(per_slot_config());
    b.enqueue(request(chat(1), 2, 1, t)).unwrap();
    run_to_idle(&mut b, t);
    // Slot 1 holds an unrelated sequence, used after slot 0's.
    b.enqueue(request((5000..5030).collect(), 2, 2, t)).unwrap();
    run_to_idle(&mut b, t);
    b.enqueue(request(chat(3), 2, 3, t)).unwrap();
    let plan = step(&mut b, t);
    // Slot 0 is the least recently used and shares the system prompt itself: no copy.
    assert_eq!(plan.admitted, vec![(0, 20)]);
    assert!(plan.copies.is_empty());
    run_to_idle(&mut b, t);
    // Now slot 1 (the unrelated one) is least recently used: it is taken, and the system
    // prompt copied from slot 0.
    b.enqueue(request(chat(4), 2, 4, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(1, 20)]);
    assert_eq!(
        plan.copies,
        vec![PrefixCopy {
            src: 0,
            dst: 1,
            len: 20
        }]
    );
}

#[test]
fn a_copy_below_the_minimum_is_not_worth_a_stream_copy() {
    let t = Instant::now();
    let mut b = Batcher::new(per_slot_config());
    let short = |c: u32| -> Vec<u32> { (0..10).chain((0..20).map(|i| 1000 * c + i)).collect() };
    b.enqueue(request(short(1), 2, 1, t)).unwrap();
    run_to_idle(&mut b, t);
    b.enqueue(request(short(2), 2, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(
        plan.admitted,
        vec![(1, 0)],
        "10 shared tokens < MIN_COPY_TOKENS"
    );
    assert!(plan.copies.is_empty());
}

#[test]
fn more_conversations_than_decode_slots_all_keep_their_history() {
    let t = Instant::now();
    let mut b = Batcher::new(BatcherConfig {
        cache_streams: 2,
        max_queue: 10,
        ..chat_config()
    });
    for c in 1..=4 {
        b.enqueue(request(chat(c), 2, c, t)).unwrap();
    }
    step(&mut b, t);
    assert_eq!(b.active(), 2, "at most --parallel sequences run at once");
    assert_eq!(b.free_kv_tokens(), 0, "cache-only streams are not capacity");
    run_to_idle(&mut b, t);
    // Every conversation's second turn reuses its whole first turn.
    for c in 1..=4 {
        let history: Vec<u32> = chat(c).into_iter().chain([7]).collect();
        let turn2: Vec<u32> = history.iter().copied().chain(600..610).collect();
        b.enqueue(request(turn2, 2, 10 + c, t)).unwrap();
        let plan = step(&mut b, t);
        assert_eq!(plan.admitted.len(), 1);
        assert_eq!(
            plan.admitted[0].1,
            history.len() as u32,
            "conversation {c}: {plan:?}"
        );
        assert!(plan.copies.is_empty());
        run_to_idle(&mut b, t);
    }
}

fn aligned_config() -> BatcherConfig {
    BatcherConfig {
        aligned_prefill: Some(8),
        step_tokens: 16,
        ..per_slot_config()
    }
}

#[test]
fn aligned_prefill_chunks_end_at_fixed_boundaries_whatever_the_budget() {
    let t = Instant::now();
    let mut b = Batcher::new(BatcherConfig {
        step_tokens: 5,
        ..aligned_config()
    });
    b.enqueue(request((0..21).collect(), 2, 1, t)).unwrap();
    b.enqueue(request((100..119).collect(), 2, 2, t)).unwrap();
    let mut chunks = [Vec::new(), Vec::new()];
    for _ in 0..8 {
        let plan = step(&mut b, t);
        for e in plan
            .entries
            .iter()
            .filter(|e| e.tokens.len() > 1 || !e.sample)
        {
            chunks[e.slot].push((e.pos, e.tokens.len()));
        }
    }
    assert_eq!(chunks[0], vec![(0, 8), (8, 8), (16, 5)]);
    assert_eq!(chunks[1], vec![(0, 8), (8, 8), (16, 3)]);
}

#[test]
fn aligned_reuse_covers_only_cells_of_whole_chunks() {
    let t = Instant::now();
    let mut b = Batcher::new(aligned_config());
    // 21 prompt tokens: chunks 0..8 and 8..16 are whole, 16..21 partial, then 2 decoded.
    b.enqueue(request((0..21).collect(), 3, 1, t)).unwrap();
    run_to_idle(&mut b, t);
    assert_eq!(b.cached_tokens(), 23);
    // The next turn extends the history: reuse stops at 16 (not 23).
    let turn2: Vec<u32> = (0..21).chain([7, 7]).chain(200..210).collect();
    b.enqueue(request(turn2, 2, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(0, 16)]);
    assert_eq!((plan.entries[0].pos, plan.entries[0].tokens.len()), (16, 8));
    run_to_idle(&mut b, t);
    // Sharing 12 tokens reuses one whole chunk, and the one prefill chunk that follows keeps
    // the alignment.
    let other: Vec<u32> = (0..12).chain(300..320).collect();
    let mut c = Batcher::new(aligned_config());
    c.enqueue(request((0..21).collect(), 3, 1, t)).unwrap();
    run_to_idle(&mut c, t);
    c.enqueue(request(other, 2, 3, t)).unwrap();
    let plan = step(&mut c, t);
    // Slot 0's cache would lose 11 tokens (< MIN_COPY_TOKENS): it is reused in place.
    assert_eq!(plan.admitted, vec![(0, 8)]);
    assert_eq!((plan.entries[0].pos, plan.entries[0].tokens.len()), (8, 8));
}

#[test]
fn an_aligned_copy_takes_only_whole_chunks() {
    let t = Instant::now();
    let mut b = Batcher::new(BatcherConfig {
        aligned_prefill: Some(16),
        ..aligned_config()
    });
    // 40 prompt tokens: 0..16 and 16..32 whole chunks; the system prompt is 20 tokens, so
    // only 16 of it can be copied.
    b.enqueue(request(chat(1), 2, 1, t)).unwrap();
    run_to_idle(&mut b, t);
    b.enqueue(request(chat(2), 2, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(1, 16)]);
    assert_eq!(
        plan.copies,
        vec![PrefixCopy {
            src: 0,
            dst: 1,
            len: 16
        }]
    );
    assert_eq!(
        (plan.entries[0].pos, plan.entries[0].tokens.len()),
        (16, 16)
    );
}

#[test]
fn a_repeated_short_prompt_is_copied_whole_and_keeps_the_answer_it_cached() {
    let t = Instant::now();
    let mut b = Batcher::new(per_slot_config());
    b.enqueue(request((0..10).collect(), 20, 1, t)).unwrap();
    run_to_idle(&mut b, t);
    // Slot 0 caches the prompt and a 19-token answer; the same prompt again gets its 9 tokens
    // copied into the empty slot, and slot 0 keeps the answer.
    b.enqueue(request((0..10).collect(), 20, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(1, 9)]);
    assert_eq!(
        plan.copies,
        vec![PrefixCopy {
            src: 0,
            dst: 1,
            len: 9
        }]
    );
}
