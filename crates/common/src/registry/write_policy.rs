//! When a worker's advert is worth an etcd write (review M5). The engine's numbers move on every
//! decode step; writing each change cost about 4 puts/s per busy worker. A change of identity or
//! state is written at once, a change that moves routing (load, KV headroom by more than a step,
//! speed by more than a fraction) at most every `min_interval`, and drift (device memory, small
//! KV or speed moves) only once `max_interval` has passed since the last write.

use std::time::Duration;

use super::WorkerAdvert;

/// KV headroom moves smaller than this fraction of the context are drift.
pub const KV_STEP: f64 = 0.05;
/// Speed moves smaller than this fraction of the written speed are drift.
pub const SPEED_STEP: f64 = 0.25;

/// How much an advert differs from the one last written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Equal apart from the write time.
    None,
    /// Numbers moved within their steps (or device memory changed).
    Drift,
    /// Load, KV headroom or speed moved enough to change routing.
    Routing,
    /// State, endpoint, model, profile or capacity limits changed.
    Identity,
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
        || written.version != next.version
        || written.schema != next.schema
        || written.capacity.context_tokens != next.capacity.context_tokens
        || written.capacity.max_sequences != next.capacity.max_sequences;
    if identity {
        return Change::Identity;
    }
    let kv_step = (f64::from(next.capacity.context_tokens) * KV_STEP).max(1.0);
    let kv_moved = f64::from(
        written
            .capacity
            .free_kv_tokens
            .abs_diff(next.capacity.free_kv_tokens),
    ) >= kv_step;
    let speed_moved = |old: f64, new: f64| {
        if old <= 0.0 || new <= 0.0 {
            (old <= 0.0) != (new <= 0.0)
        } else {
            ((new - old) / old).abs() > SPEED_STEP
        }
    };
    let routing = written.load != next.load
        || kv_moved
        || speed_moved(
            written.speed.decode_tokens_per_second,
            next.speed.decode_tokens_per_second,
        )
        || speed_moved(
            written.speed.prefill_tokens_per_second,
            next.speed.prefill_tokens_per_second,
        );
    if routing {
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
    fn state_change_is_written_at_once_and_load_within_min_interval() {
        let a = sample("w1");
        let mut draining = a.clone();
        draining.state = WorkerState::Draining;
        assert_eq!(classify(&a, &draining), Change::Identity);
        assert!(POLICY.due(&a, Duration::ZERO, &draining));

        let mut busier = a.clone();
        busier.load.active += 1;
        assert_eq!(classify(&a, &busier), Change::Routing);
        assert!(!POLICY.due(&a, Duration::from_millis(100), &busier));
        assert!(POLICY.due(&a, Duration::from_millis(250), &busier));

        let mut kv = a.clone();
        kv.capacity.free_kv_tokens =
            a.capacity.free_kv_tokens - (f64::from(a.capacity.context_tokens) * 0.06) as u32;
        assert_eq!(classify(&a, &kv), Change::Routing);

        let mut same = a.clone();
        same.updated_unix_ms += 1000;
        assert_eq!(classify(&a, &same), Change::None);
        assert!(!POLICY.due(&a, Duration::from_secs(60), &same));
    }
}
