//! When a worker's advert is worth an etcd write (review M5). The engine's numbers move on every
//! decode step and with every request that starts or ends; writing each change cost about 4 puts/s
//! per busy worker, and every put is a raft entry that etcd keeps in memory until its next
//! snapshot (the soak's etcd grew 81 % in 30 minutes). So only what changes a gateway's decision
//! is written promptly:
//!
//! - identity or state (draining, endpoint, model, profile, capacity limits): at once;
//! - routing (at most every `min_interval`): the worker reaching or leaving its last free slot or
//!   starting or emptying its queue (below that a gateway's choice between workers moves by less
//!   than one decode step, and it counts its own placements anyway), KV headroom moving by a
//!   [`KV_STEP`] while the lower value is under [`KV_LOW`] of the context (where a request may not
//!   fit), a speed becoming known or unknown;
//! - drift (load and KV headroom away from those limits, speed jitter, device memory): only once
//!   `max_interval` (the lease TTL) has passed since the last write, so an advert is never more
//!   than that stale.

use std::time::Duration;

use super::WorkerAdvert;

/// KV headroom moves smaller than this fraction of the context are drift.
pub const KV_STEP: f64 = 0.05;
/// KV headroom moves are routing only while the lower of the two values is under this fraction of
/// the context: with more free, a request fits either way.
pub const KV_LOW: f64 = 0.25;

/// How much an advert differs from the one last written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Equal apart from the write time.
    None,
    /// Numbers moved away from the limits that change routing (or device memory changed).
    Drift,
    /// Saturation, queueing, low KV headroom or a speed becoming known changed.
    Routing,
    /// State, endpoint, model, profile or capacity limits changed.
    Identity,
}

/// Streams on the worker: running and queued.
fn busy(a: &WorkerAdvert) -> u32 {
    a.load.active.saturating_add(a.load.queued)
}

/// Classifies `next` against the advert last written.
pub fn classify(written: &WorkerAdvert, next: &WorkerAdvert) -> Change {
    let mut a = written.clone();
    a.updated_unix_ms = next.updated_unix_ms;
    if a == *next {
        return Change::None;
    }
    let identity = written.state != next.state
        || written.id != next.id
        || written.endpoint != next.endpoint
        || written.model != next.model
        || written.model_fingerprint != next.model_fingerprint
        || written.offload != next.offload
        || written.features != next.features
        || written.version != next.version
        || written.schema != next.schema
        || written.capacity.context_tokens != next.capacity.context_tokens
        || written.capacity.max_sequences != next.capacity.max_sequences;
    if identity {
        return Change::Identity;
    }
    // Load: near or at saturation (at most one free slot on either side) every move counts, as
    // does the queue starting or emptying; below that it is drift.
    let slots = next.capacity.max_sequences;
    let (was, is) = (busy(written), busy(next));
    let near_full = |b: u32| slots.saturating_sub(b) <= 1;
    // Going from idle to busy or back is drift, not routing: written as routing (51f6984) it
    // cost two puts a request on a lightly loaded worker, 1.34 puts/s for the soak's 3 workers
    // against 0.22, and etcd's RSS grew 16 % in 25 minutes instead of 7 % in 30 (docs/benchmarks/
    // soak.md). A gateway counts its own placements, saturation is routing above, and the lease
    // TTL bounds how stale the idle view gets (tests that wait for idle run a 3 s TTL).
    let load_moved = was != is
        && (near_full(was) || near_full(is) || (written.load.queued > 0) != (next.load.queued > 0));
    // KV headroom: a step's move counts while headroom is low.
    let context = f64::from(next.capacity.context_tokens);
    let (kv_was, kv_is) = (
        written.capacity.free_kv_tokens,
        next.capacity.free_kv_tokens,
    );
    let kv_moved = f64::from(kv_was.abs_diff(kv_is)) >= (context * KV_STEP).max(1.0)
        && f64::from(kv_was.min(kv_is)) < context * KV_LOW;
    // Speed: per-sequence decode speed swings with the batch (4x within seconds on a CPU); only
    // becoming known or unknown is routing, the rest is drift.
    let known = |x: f64| x > 0.0;
    let speed_known = known(written.speed.decode_tokens_per_second)
        != known(next.speed.decode_tokens_per_second)
        || known(written.speed.prefill_tokens_per_second)
            != known(next.speed.prefill_tokens_per_second);
    if load_moved || kv_moved || speed_known {
        Change::Routing
    } else {
        Change::Drift
    }
}

/// The write rule: identity at once, routing changes at most every `min_interval`, drift after
/// `max_interval`.
#[derive(Clone, Copy, Debug)]
pub struct WritePolicy {
    pub min_interval: Duration,
    pub max_interval: Duration,
}

impl WritePolicy {
    /// Whether to write `next` now, `since_write` after `written` was written.
    pub fn due(&self, written: &WorkerAdvert, since_write: Duration, next: &WorkerAdvert) -> bool {
        match classify(written, next) {
            Change::None => false,
            Change::Drift => since_write >= self.max_interval,
            Change::Routing => since_write >= self.min_interval,
            Change::Identity => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{DeviceInfo, WorkerState, advert::tests::sample};

    /// Replays `adverts` one every `step`, writing whenever the policy says so and also checking
    /// at every `step` tick (as the registrar's flush timer does). Returns the writes.
    fn replay(policy: WritePolicy, step: Duration, adverts: &[WorkerAdvert]) -> Vec<WorkerAdvert> {
        let mut written = vec![adverts[0].clone()];
        let mut since = Duration::ZERO;
        for next in &adverts[1..] {
            since += step;
            if policy.due(written.last().unwrap(), since, next) {
                written.push(next.clone());
                since = Duration::ZERO;
            }
        }
        written
    }

    const POLICY: WritePolicy = WritePolicy {
        min_interval: Duration::from_millis(250),
        max_interval: Duration::from_secs(5),
    };

    #[test]
    fn busy_worker_with_drifting_numbers_writes_rarely() {
        // 60 s of stats every 100 ms: speed jitters ±10 %, KV headroom drifts by 1 token a step
        // (of 4096), device memory changes; load stays at 3 active. The old rule wrote about
        // 4/s (240 writes); drift is now written every max_interval (12 writes).
        let base = sample("w1");
        let adverts: Vec<_> = (0..600u32)
            .map(|i| {
                let mut a = base.clone();
                a.speed.decode_tokens_per_second = 50.0 * (1.0 + 0.1 * f64::from(i % 3) - 0.1);
                a.capacity.free_kv_tokens = 3000 - i / 4;
                a.load.active = 3;
                a.devices = vec![DeviceInfo {
                    free_bytes: 1_000_000 + u64::from(i),
                    ..Default::default()
                }];
                a
            })
            .collect();
        let writes = replay(POLICY, Duration::from_millis(100), &adverts);
        assert!(
            writes.len() <= 13,
            "{} writes in 60 s of drift",
            writes.len()
        );
        assert!(
            writes.len() >= 11,
            "drift must still be written every max_interval"
        );
    }

    #[test]
    fn state_change_is_written_at_once_and_saturation_within_min_interval() {
        let a = sample("w1");
        let mut draining = a.clone();
        draining.state = WorkerState::Draining;
        assert_eq!(classify(&a, &draining), Change::Identity);
        assert!(POLICY.due(&a, Duration::ZERO, &draining));

        // 4 slots: 2 → 3 running leaves one free slot, 3 → 4 fills it, a queue starts.
        let with = |active: u32, queued: u32| {
            let mut x = a.clone();
            x.load.active = active;
            x.load.queued = queued;
            x
        };
        for (from, to) in [
            (with(2, 0), with(3, 0)),
            (with(3, 0), with(4, 0)),
            (with(4, 0), with(3, 0)),
            (with(4, 0), with(4, 1)),
            (with(4, 2), with(4, 1)),
        ] {
            assert_eq!(
                classify(&from, &to),
                Change::Routing,
                "{:?} → {:?}",
                from.load,
                to.load
            );
            assert!(!POLICY.due(&from, Duration::from_millis(100), &to));
            assert!(POLICY.due(&from, Duration::from_millis(250), &to));
        }
        // Well below saturation a load move is drift, written within max_interval.
        for (from, to) in [(with(0, 0), with(1, 0)), (with(2, 0), with(1, 0))] {
            assert_eq!(
                classify(&from, &to),
                Change::Drift,
                "{:?} → {:?}",
                from.load,
                to.load
            );
            assert!(!POLICY.due(&from, Duration::from_secs(4), &to));
            assert!(POLICY.due(&from, Duration::from_secs(5), &to));
        }

        // KV headroom: a 6 % move is routing only when headroom is low.
        let kv = |free: u32| {
            let mut x = a.clone();
            x.capacity.free_kv_tokens = free;
            x
        };
        let step = (f64::from(a.capacity.context_tokens) * 0.06) as u32;
        assert_eq!(classify(&kv(800), &kv(800 - step)), Change::Routing);
        assert_eq!(classify(&kv(800 - step), &kv(800)), Change::Routing);
        assert_eq!(classify(&kv(3000), &kv(3000 - step)), Change::Drift);
        assert_eq!(classify(&kv(800), &kv(790)), Change::Drift);

        // Speed: becoming known is routing, jitter of any size is drift.
        let speed = |tps: f64| {
            let mut x = a.clone();
            x.speed.decode_tokens_per_second = tps;
            x
        };
        assert_eq!(classify(&speed(0.0), &speed(50.0)), Change::Routing);
        assert_eq!(classify(&speed(50.0), &speed(13.0)), Change::Drift);

        let mut same = a.clone();
        same.updated_unix_ms += 1000;
        assert_eq!(classify(&a, &same), Change::None);
        assert!(!POLICY.due(&a, Duration::from_secs(60), &same));
    }

    #[test]
    fn worker_between_idle_and_half_load_writes_once_per_max_interval() {
        // The soak's busy worker (4 slots, 2048 cells of 512 per sequence): 0–2 streams change
        // every ~300 ms, KV headroom moves 512 cells with each, decode speed swings 13–57 tok/s.
        // The old rule wrote ~2/s (120 writes a minute); now only drift, every max_interval.
        let mut base = sample("w1");
        base.capacity.context_tokens = 2048;
        let pattern = [1u32, 2, 1, 0, 1, 2, 2, 1, 0, 1];
        let adverts: Vec<_> = (0..200usize)
            .map(|i| {
                let mut a = base.clone();
                a.load.active = pattern[i % pattern.len()];
                a.capacity.free_kv_tokens = 2048 - 512 * a.load.active;
                a.speed.decode_tokens_per_second = [14.0, 50.0, 35.0, 18.0, 57.0][i % 5];
                a.speed.prefill_tokens_per_second = 40.0 + (i % 7) as f64;
                a
            })
            .collect();
        let writes = replay(POLICY, Duration::from_millis(300), &adverts);
        // 60 s at one write per 5 s, plus the first.
        assert!(writes.len() <= 13, "{} writes in 60 s", writes.len());
        assert!(
            writes.len() >= 11,
            "drift must still be written every max_interval"
        );
    }
}
