//! Passive outlier ejection (review M3): a worker whose requests fail several times in a row
//! (refused with UNAVAILABLE, reset streams, silent past the idle timeout, unreachable) is left
//! out of placement for a while, doubling on each new ejection, instead of staying first-ranked
//! until its etcd lease expires. Success clears its record. Kept per gateway, by worker id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a worker is ejected and for how long.
#[derive(Clone, Copy, Debug)]
pub struct OutlierConfig {
    /// Consecutive failed attempts that eject a worker; 0 turns ejection off.
    pub failures: u32,
    /// First ejection; each further one doubles it, up to `max_ejection`.
    pub ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            failures: 3,
            ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Default)]
struct Record {
    consecutive: u32,
    /// Ejections so far (the backoff exponent).
    ejections: u32,
    ejected_until: Option<Instant>,
}

#[derive(Debug, Default)]
pub(crate) struct Outliers {
    config: OutlierConfig,
    by_worker: Mutex<HashMap<String, Record>>,
}

impl Outliers {
    pub(crate) fn new(config: OutlierConfig) -> Self {
        Outliers {
            config,
            by_worker: Mutex::default(),
        }
    }

    /// Counts a failed attempt on `worker`; returns the ejection period when this failure
    /// ejects it.
    pub(crate) fn failed(&self, worker: &str, now: Instant) -> Option<Duration> {
        if self.config.failures == 0 {
            return None;
        }
        let mut map = self.by_worker.lock().expect("outliers lock");
        let r = map.entry(worker.to_string()).or_default();
        r.consecutive += 1;
        if r.consecutive < self.config.failures {
            return None;
        }
        let period = self
            .config
            .ejection
            .saturating_mul(1u32 << r.ejections.min(16))
            .min(self.config.max_ejection);
        r.consecutive = 0;
        r.ejections += 1;
        r.ejected_until = Some(now + period);
        Some(period)
    }

    /// A request finished on `worker`: its record is cleared.
    pub(crate) fn succeeded(&self, worker: &str) {
        self.by_worker.lock().expect("outliers lock").remove(worker);
    }

    /// Workers ejected at `now`.
    pub(crate) fn ejected(&self, now: Instant) -> Vec<String> {
        self.by_worker
            .lock()
            .expect("outliers lock")
            .iter()
            .filter(|(_, r)| r.ejected_until.is_some_and(|t| t > now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forgets workers no longer in the cluster.
    pub(crate) fn retain(&self, live: impl Fn(&str) -> bool) {
        self.by_worker
            .lock()
            .expect("outliers lock")
            .retain(|id, _| live(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outliers() -> Outliers {
        Outliers::new(OutlierConfig {
            failures: 2,
            ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
        })
    }

    #[test]
    fn ejects_after_consecutive_failures_with_doubling_backoff() {
        let o = outliers();
        let t = Instant::now();
        assert_eq!(o.failed("a", t), None);
        assert!(o.ejected(t).is_empty());
        assert_eq!(o.failed("a", t), Some(Duration::from_secs(1)));
        assert_eq!(o.ejected(t), vec!["a".to_string()]);
        assert!(
            o.ejected(t + Duration::from_secs(1)).is_empty(),
            "back after the period"
        );
        o.failed("a", t);
        assert_eq!(o.failed("a", t), Some(Duration::from_secs(2)), "doubled");
        o.failed("a", t);
        assert_eq!(o.failed("a", t), Some(Duration::from_secs(3)), "capped");
    }

    #[test]
    fn success_clears_the_record() {
        let o = outliers();
        let t = Instant::now();
        o.failed("a", t);
        o.succeeded("a");
        assert_eq!(o.failed("a", t), None, "the count started again");
    }

    #[test]
    fn zero_failures_turns_ejection_off() {
        let o = Outliers::new(OutlierConfig {
            failures: 0,
            ..OutlierConfig::default()
        });
        for _ in 0..10 {
            assert_eq!(o.failed("a", Instant::now()), None);
        }
    }
}
