//! Behaviour tests of the modelled worker.

use super::*;

fn model(kv: u32, slots: u32) -> ProfileModel {
    ProfileModel {
        kv_tokens: kv,
        max_sequences: slots,
        step_base_s: 0.004,
        step_per_seq_s: 0.001,
        prefill_tps: 1000.0,
        step_tokens: 64,
    }
}

fn worker(kv: u32, slots: u32) -> SimWorker {
    SimWorker::new(Profile::Full, model(kv, slots), QueueDiscipline::Fifo, 8)
}

fn job(req: usize, class: LatencyClass, prompt: u32, answer: u32) -> Job {
    Job {
        cached: 0,
        req,
        class,
        prompt,
        answer,
    }
}

/// Ends the step under way (if any), then runs steps until the worker is idle; returns the
/// requests in first-token order and in finish order.
fn run_to_idle(w: &mut SimWorker) -> (Vec<usize>, Vec<usize>) {
    let (mut first, mut done) = (Vec::new(), Vec::new());
    if w.is_stepping() {
        w.finish_step(&mut first, &mut done);
    }
    while w.start_step().is_some() {
        w.finish_step(&mut first, &mut done);
    }
    (first, done)
}

#[test]
fn admission_waits_for_kv_headroom() {
    let mut w = worker(100, 4);
    w.offer(job(0, LatencyClass::Batch, 50, 20)).unwrap();
    w.offer(job(1, LatencyClass::Batch, 20, 20)).unwrap();
    assert_eq!(w.unclaimed_kv(), 0, "70 + 40 queued exceed the 100 cells");
    w.start_step().unwrap();
    assert_eq!(
        (w.active(), w.queued()),
        (1, 1),
        "70 + 40 > 100: the second waits"
    );
    assert_eq!(w.free_kv(), 30);
    let (first, done) = run_to_idle(&mut w);
    assert_eq!(first, vec![0, 1]);
    assert_eq!(done, vec![0, 1]);
    assert_eq!(w.free_kv(), 100, "finished requests free their reservation");
}

#[test]
fn admission_respects_sequence_slots() {
    let mut w = worker(10_000, 2);
    for r in 0..3 {
        w.offer(job(r, LatencyClass::Interactive, 4, 3)).unwrap();
    }
    w.start_step().unwrap();
    assert_eq!((w.active(), w.queued()), (2, 1));
    let (_, done) = run_to_idle(&mut w);
    assert_eq!(done, vec![0, 1, 2]);
}

#[test]
fn queue_is_head_of_line_in_fifo_order() {
    let mut w = worker(100, 4);
    w.offer(job(0, LatencyClass::Batch, 60, 10)).unwrap();
    w.offer(job(1, LatencyClass::Batch, 60, 10)).unwrap();
    w.offer(job(2, LatencyClass::Interactive, 5, 5)).unwrap();
    w.start_step().unwrap();
    assert_eq!(
        w.active(),
        1,
        "the small request does not overtake the one that does not fit"
    );
}

#[test]
fn interactive_first_admits_interactive_ahead_of_batch() {
    let mut w = SimWorker::new(
        Profile::CpuMoe,
        model(100, 4),
        QueueDiscipline::InteractiveFirst,
        8,
    );
    w.offer(job(0, LatencyClass::Batch, 60, 10)).unwrap();
    w.offer(job(1, LatencyClass::Interactive, 20, 5)).unwrap();
    w.start_step().unwrap();
    assert_eq!(w.active(), 2);
    let mut w = SimWorker::new(
        Profile::CpuMoe,
        model(50, 1),
        QueueDiscipline::InteractiveFirst,
        8,
    );
    w.offer(job(0, LatencyClass::Batch, 10, 10)).unwrap();
    w.offer(job(1, LatencyClass::Interactive, 10, 10)).unwrap();
    let (first, _) = run_to_idle(&mut w);
    assert_eq!(first, vec![1, 0]);
}

#[test]
fn refuses_what_can_never_fit_and_a_full_queue() {
    let mut w = worker(100, 4);
    assert_eq!(
        w.offer(job(0, LatencyClass::Batch, 90, 20)),
        Err(Refusal::TooLong)
    );
    for r in 0..8 {
        w.offer(job(r, LatencyClass::Batch, 1, 1)).unwrap();
    }
    assert_eq!(
        w.offer(job(9, LatencyClass::Batch, 1, 1)),
        Err(Refusal::QueueFull)
    );
}

#[test]
fn decode_step_time_grows_with_the_batch() {
    let m = ProfileModel::full();
    let one = m.step_seconds(1, 0);
    let sixteen = m.step_seconds(16, 0);
    assert!(sixteen > one);
    assert!(
        (1.0 / one - 250.0).abs() < 1.0,
        "single stream ≈ 250 tok/s, got {}",
        1.0 / one
    );
    let mut w = worker(10_000, 8);
    w.offer(job(0, LatencyClass::Interactive, 1, 50)).unwrap();
    w.start_step().unwrap();
    w.finish_step(&mut Vec::new(), &mut Vec::new());
    let alone = w.start_step().unwrap();
    w.finish_step(&mut Vec::new(), &mut Vec::new());
    for r in 1..8 {
        w.offer(job(r, LatencyClass::Interactive, 1, 50)).unwrap();
    }
    w.start_step().unwrap();
    w.finish_step(&mut Vec::new(), &mut Vec::new());
    let crowded = w.start_step().unwrap();
    assert!(
        (alone - 0.005).abs() < 1e-9,
        "4 ms + 1 ms for one sequence, got {alone}"
    );
    assert!(
        (crowded - 0.012).abs() < 1e-9,
        "4 ms + 8 × 1 ms, got {crowded}"
    );
}

#[test]
fn prompt_is_prefilled_in_chunks_and_the_first_token_ends_the_last_chunk() {
    let mut w = worker(10_000, 4);
    w.offer(job(0, LatencyClass::Batch, 150, 2)).unwrap();
    let mut first = Vec::new();
    let mut steps = Vec::new();
    while first.is_empty() {
        steps.push(w.start_step().unwrap());
        w.finish_step(&mut first, &mut Vec::new());
    }
    assert_eq!(steps.len(), 3, "150 tokens in chunks of 64");
    assert!((steps[0] - (0.004 + 0.064)).abs() < 1e-9);
    assert!((steps[2] - (0.004 + 0.022)).abs() < 1e-9);
    let (_, done) = run_to_idle(&mut w);
    assert_eq!(done, vec![0], "second token one decode step later");
}

#[test]
fn eviction_returns_running_and_queued_work_with_progress() {
    let mut w = worker(100, 1);
    w.offer(job(0, LatencyClass::Interactive, 2, 10)).unwrap();
    w.offer(job(1, LatencyClass::Interactive, 2, 10)).unwrap();
    for _ in 0..3 {
        w.start_step().unwrap();
        w.finish_step(&mut Vec::new(), &mut Vec::new());
    }
    let out = w.evict();
    assert_eq!(
        out.iter().map(|(j, g)| (j.req, *g)).collect::<Vec<_>>(),
        vec![(0, 3), (1, 0)]
    );
    assert_eq!(
        (w.free_kv(), w.unclaimed_kv(), w.active(), w.queued()),
        (100, 100, 0, 0)
    );
}
