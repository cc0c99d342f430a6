//! Live stats on the engine thread: prefill and decode speeds, device memory refreshed every
//! `DEVICE_REFRESH` (here, so that no FFI runs on the async runtime), and publishing.

use std::time::{Duration, Instant};

use super::super::devices::refresh_devices;
use super::{DEVICE_REFRESH, Engine};

impl Engine<'_> {
    pub(super) fn update_speed(&mut self, n_prefill: usize, elapsed: f64) {
        const ALPHA: f64 = 0.2;
        let ema = |old: f64, new: f64| {
            if old == 0.0 {
                new
            } else {
                old * (1.0 - ALPHA) + new * ALPHA
            }
        };
        if n_prefill > 0 {
            self.stats.prefill_tokens_per_second = ema(
                self.stats.prefill_tokens_per_second,
                n_prefill as f64 / elapsed,
            );
        } else {
            self.stats.decode_tokens_per_second =
                ema(self.stats.decode_tokens_per_second, 1.0 / elapsed);
        }
    }

    pub(super) fn publish(&mut self, force: bool) {
        if self.last_refresh.elapsed() >= DEVICE_REFRESH {
            self.last_refresh = Instant::now();
            refresh_devices(&mut self.stats.devices);
        }
        if !force && self.last_publish.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_publish = Instant::now();
        self.stats.active = self.batcher.active() as u32;
        self.stats.queued = self.batcher.queued() as u32;
        // Queued requests' claims count too, so gateways stop placing here as soon as memory is
        // spoken for, not only once it is admitted.
        self.stats.free_kv_tokens = self.batcher.unclaimed_kv_tokens();
        let stats = self.stats.clone();
        self.stats_tx.send_if_modified(|s| {
            if *s == stats {
                false
            } else {
                *s = stats;
                true
            }
        });
    }
}
