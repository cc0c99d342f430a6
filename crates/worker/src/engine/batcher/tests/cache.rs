//! Unit tests of the batcher's prefix cache: which stream an admission takes, the prefix it
//! reuses in place or copies from another stream, eviction, the reuse rule for sliding-window
//! caches, the published cached sequences, and aligned prefill chunks (sequential mode).

use super::*;

fn run_to_idle(b: &mut Batcher<u32>, t: Instant) {
    while !b.is_idle() {
        step(b, t);
    }
}

/// A batcher with `config` that has run `first` to the end: its cache holds `first`'s prompt
/// and what it generated.
fn after_serving(config: BatcherConfig, first: Pending<u32>, t: Instant) -> Batcher<u32> {
    let mut b = Batcher::new(config);
    b.enqueue(first).unwrap();
    run_to_idle(&mut b, t);
    b
}

/// A copy of the first `len` cells of stream `src` into stream `dst`.
fn copy(src: usize, dst: usize, len: u32) -> PrefixCopy {
    PrefixCopy { src, dst, len }
}

#[test]
fn reuses_the_longest_cached_prefix_and_skips_recomputing_it() {
    let t = Instant::now();
    let mut b = Batcher::new(config());
    b.enqueue(pending(10, 2, LatencyClass::Interactive, 1, t))
        .unwrap();
    b.enqueue(pending(3, 2, LatencyClass::Interactive, 2, t))
        .unwrap();
    run_to_idle(&mut b, t);
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
    let mut b = after_serving(config(), pending(6, 2, LatencyClass::Interactive, 1, t), t);
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
        run_to_idle(&mut b, t);
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
fn with_per_slot_streams_admission_never_evicts_another_slots_cache() {
    let t = Instant::now();
    let mut b = after_serving(
        per_slot_config(),
        pending(30, 1, LatencyClass::Interactive, 1, t),
        t,
    );
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
    let mut b = after_serving(config(), pending(10, 2, LatencyClass::Interactive, 1, t), t);
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
    let mut b = after_serving(chat_config(), request(chat(1), 2, 1, t), t);
    // Conversation B shares only the system prompt with A's history in slot 0: it takes the
    // empty slot, with the system prompt copied there.
    b.enqueue(request(chat(2), 2, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(1, 20)], "{plan:?}");
    assert_eq!(plan.copies, vec![copy(0, 1, 20)]);
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
    let mut b = after_serving(per_slot_config(), request(chat(1), 2, 1, t), t);
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
    assert_eq!(plan.copies, vec![copy(0, 1, 20)]);
}

#[test]
fn a_copy_below_the_minimum_is_not_worth_a_stream_copy() {
    let t = Instant::now();
    let short = |c: u32| -> Vec<u32> { (0..10).chain((0..20).map(|i| 1000 * c + i)).collect() };
    let mut b = after_serving(per_slot_config(), request(short(1), 2, 1, t), t);
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
    // 21 prompt tokens: chunks 0..8 and 8..16 are whole, 16..21 partial, then 2 decoded.
    let mut b = after_serving(aligned_config(), request((0..21).collect(), 3, 1, t), t);
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
    let mut c = after_serving(aligned_config(), request((0..21).collect(), 3, 1, t), t);
    c.enqueue(request(other, 2, 3, t)).unwrap();
    let plan = step(&mut c, t);
    // Slot 0's cache would lose 11 tokens (< MIN_COPY_TOKENS): it is reused in place.
    assert_eq!(plan.admitted, vec![(0, 8)]);
    assert_eq!((plan.entries[0].pos, plan.entries[0].tokens.len()), (8, 8));
}

#[test]
fn an_aligned_copy_takes_only_whole_chunks() {
    let t = Instant::now();
    let chunks_of_16 = BatcherConfig {
        aligned_prefill: Some(16),
        ..aligned_config()
    };
    // 40 prompt tokens: 0..16 and 16..32 whole chunks; the system prompt is 20 tokens, so
    // only 16 of it can be copied.
    let mut b = after_serving(chunks_of_16, request(chat(1), 2, 1, t), t);
    b.enqueue(request(chat(2), 2, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(1, 16)]);
    assert_eq!(plan.copies, vec![copy(0, 1, 16)]);
    assert_eq!(
        (plan.entries[0].pos, plan.entries[0].tokens.len()),
        (16, 16)
    );
}

#[test]
fn a_repeated_short_prompt_is_copied_whole_and_keeps_the_answer_it_cached() {
    let t = Instant::now();
    let mut b = after_serving(per_slot_config(), request((0..10).collect(), 20, 1, t), t);
    // Slot 0 caches the prompt and a 19-token answer; the same prompt again gets its 9 tokens
    // copied into the empty slot, and slot 0 keeps the answer.
    b.enqueue(request((0..10).collect(), 20, 2, t)).unwrap();
    let plan = step(&mut b, t);
    assert_eq!(plan.admitted, vec![(1, 9)]);
    assert_eq!(plan.copies, vec![copy(0, 1, 9)]);
}
