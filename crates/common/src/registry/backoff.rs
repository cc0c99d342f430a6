//! The retry timing of the registry tasks: the registrar re-registering after etcd failed, the
//! watcher re-listing after a list or watch failed. Kept apart from the etcd calls so that the
//! timing is tested on paused tokio time.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Waits that double after each failure, up to a ceiling, and start over after a success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    delay: Duration,
}

impl Backoff {
    /// The registrar's: 250 ms, doubling to 5 s.
    pub fn registrar() -> Self {
        Backoff::new(Duration::from_millis(250), Duration::from_secs(5))
    }

    /// The watcher's: 100 ms, doubling to 5 s; also the pause before re-listing after a watch
    /// ended.
    pub fn watcher() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            delay: first,
        }
    }

    /// The next wait.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.delay = self.first;
    }

    /// After a failure: waits the current delay, then doubles it (up to the ceiling). False when
    /// `stop` was cancelled first.
    pub async fn failed(&mut self, stop: &CancellationToken) -> bool {
        let slept = self.pause(stop).await;
        self.delay = (self.delay * 2).min(self.max);
        slept
    }

    /// Waits the current delay without growing it. False when `stop` was cancelled first.
    pub async fn pause(&self, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(self.delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// How long each of `n` consecutive failures waited.
    async fn waits(b: &mut Backoff, n: usize) -> Vec<u64> {
        let stop = CancellationToken::new();
        let mut out = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            assert!(b.failed(&stop).await);
            out.push(t.elapsed().as_millis() as u64);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn registrar_retries_double_from_250_ms_to_5_s() {
        let mut b = Backoff::registrar();
        assert_eq!(
            waits(&mut b, 7).await,
            [250, 500, 1000, 2000, 4000, 5000, 5000]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_starts_the_waits_over() {
        let mut b = Backoff::registrar();
        waits(&mut b, 4).await;
        assert_eq!(b.delay(), Duration::from_secs(4));
        b.reset();
        assert_eq!(waits(&mut b, 2).await, [250, 500]);
    }

    #[tokio::test(start_paused = true)]
    async fn watcher_relists_after_100_ms_and_backs_off_while_listing_fails() {
        let mut b = Backoff::watcher();
        let stop = CancellationToken::new();
        // A watch that ended: the re-list comes after the pause, which does not grow.
        for _ in 0..3 {
            let t = Instant::now();
            assert!(b.pause(&stop).await);
            assert_eq!(t.elapsed(), Duration::from_millis(100));
        }
        // Lists that fail: doubling to 5 s.
        assert_eq!(
            waits(&mut b, 8).await,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_a_wait_at_once() {
        let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
        let stop = CancellationToken::new();
        let cancel = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            cancel.cancel();
        });
        let t = Instant::now();
        assert!(!b.failed(&stop).await);
        assert_eq!(t.elapsed(), Duration::from_secs(1));
        assert!(!b.pause(&stop).await, "already stopped");
    }
}
