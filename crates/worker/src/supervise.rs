//! Engine supervision (review H3): the engine thread publishes its stats on a watch channel; the
//! channel closing means the thread is gone (panicked or returned), and stats that stop moving
//! while the engine holds work (active or queued sequences) mean it is wedged. Either way the
//! worker must stop looking healthy: `run` then goes NOT_SERVING, leaves etcd and exits non-zero
//! so that the orchestrator restarts it.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::engine::EngineStats;

/// Why the worker gives up on its engine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineFault {
    #[error("the engine thread stopped (it panicked or returned)")]
    Died,
    #[error("the engine made no progress for {0:?} while it held work")]
    Wedged(Duration),
}

/// Whether the engine holds work it should be making progress on.
pub fn has_work(stats: &EngineStats) -> bool {
    stats.active > 0 || stats.queued > 0
}

/// Returns when the engine dies, or when its stats have not changed for `stall` while
/// [`has_work`] says it is busy. A zero `stall` only watches for death. Runs until then.
pub async fn watch_engine(mut stats: watch::Receiver<EngineStats>, stall: Duration) -> EngineFault {
    let check = if stall.is_zero() {
        Duration::from_secs(3600)
    } else {
        (stall / 4).max(Duration::from_millis(10))
    };
    let mut last_progress = Instant::now();
    loop {
        tokio::select! {
            changed = stats.changed() => {
                if changed.is_err() {
                    return EngineFault::Died;
                }
                last_progress = Instant::now();
            }
            _ = tokio::time::sleep(check) => {
                if !has_work(&stats.borrow()) {
                    last_progress = Instant::now();
                } else if !stall.is_zero() && last_progress.elapsed() >= stall {
                    return EngineFault::Wedged(stall);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_millis(200);

    fn busy() -> EngineStats {
        EngineStats {
            active: 1,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_dropped_stats_channel_is_a_dead_engine() {
        let (tx, rx) = watch::channel(EngineStats::default());
        let supervisor = tokio::spawn(watch_engine(rx, STALL));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!supervisor.is_finished(), "an idle, live engine is fine");
        drop(tx);
        let fault = tokio::time::timeout(Duration::from_secs(2), supervisor)
            .await
            .expect("noticed at once")
            .unwrap();
        assert_eq!(fault, EngineFault::Died);
    }

    #[tokio::test]
    async fn busy_stats_that_stop_moving_are_a_wedged_engine() {
        let (tx, rx) = watch::channel(busy());
        let started = Instant::now();
        let fault = tokio::time::timeout(Duration::from_secs(2), watch_engine(rx, STALL))
            .await
            .expect("wedge noticed");
        assert_eq!(fault, EngineFault::Wedged(STALL));
        assert!(started.elapsed() >= STALL);
        drop(tx);
    }

    #[tokio::test]
    async fn progress_or_idleness_is_not_a_wedge() {
        // Busy and generating: the counter moves every 50 ms for 4 stall periods.
        let (tx, rx) = watch::channel(busy());
        let supervisor = tokio::spawn(watch_engine(rx, STALL));
        for i in 0..16u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_modify(|s| s.generated_tokens_total = i);
        }
        assert!(
            !supervisor.is_finished(),
            "a progressing engine is not wedged"
        );
        // Idle with unchanging stats for 4 stall periods: fine too.
        tx.send_modify(|s| s.active = 0);
        tokio::time::sleep(STALL * 4).await;
        assert!(!supervisor.is_finished(), "an idle engine is not wedged");
        supervisor.abort();
    }
}
