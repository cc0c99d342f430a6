//! Background BATCH load: K loops that keep one BATCH stream each running on the gRPC target
//! while interactive levels are measured. Bounded in requests per loop and in time.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::config::BenchConfig;
use crate::report::{BackgroundReport, ErrorTally};
use moe_common::LatencyClass;

/// At most this many requests per background loop.
const MAX_REQUESTS_PER_LOOP: u64 = 10_000;

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    errors: AtomicU64,
    tokens: AtomicU64,
    /// Every generated token received, whether or not its request completes.
    streamed: Arc<AtomicU64>,
    /// Requests cancelled by `stop` while in flight.
    cancelled: AtomicU64,
    /// Set once the measured levels begin (`wait_streaming` returned).
    measuring: AtomicBool,
    errors_before_measurement: AtomicU64,
    tally: Mutex<ErrorTally>,
}

impl Counters {
    fn error(&self, e: &crate::client::BenchError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if !self.measuring.load(Ordering::Relaxed) {
            self.errors_before_measurement
                .fetch_add(1, Ordering::Relaxed);
        }
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(e);
    }
}

pub struct Background {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    streaming: Arc<AtomicU32>,
    counters: Arc<Counters>,
    streams: u32,
    max_tokens: u32,
    started: Instant,
}

impl Background {
    pub fn start(client: &Client, config: &BenchConfig, cancel: &CancellationToken) -> Self {
        let stop = cancel.child_token();
        let streaming = Arc::new(AtomicU32::new(0));
        let counters = Arc::new(Counters::default());
        // Measured levels plus the wait for the streams to start, with room to spare.
        let deadline = Instant::now()
            + config.level_timeout * (config.concurrency.len() as u32 + 1)
            + config.request_timeout;
        let mut tasks = JoinSet::new();
        for k in 0..config.background_batch {
            let (client, stop, config) = (client.clone(), stop.clone(), config.clone());
            let (streaming, counters) = (streaming.clone(), counters.clone());
            tasks.spawn(async move {
                for n in 0..MAX_REQUESTS_PER_LOOP {
                    if stop.is_cancelled() || Instant::now() >= deadline {
                        return;
                    }
                    let index = super::INDEX_STRIDE * (500 + u64::from(k)) + n;
                    let mut spec =
                        super::spec(&config, LatencyClass::Batch, index, Some(streaming.clone()));
                    spec.received = Some(counters.streamed.clone());
                    let outcome = tokio::select! {
                        r = client.generate(&spec, config.request_timeout) => r,
                        () = stop.cancelled() => {
                            // Dropping the stream cancels it: the end of the run, not an error.
                            counters.cancelled.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    match outcome {
                        Ok(s) => {
                            counters.completed.fetch_add(1, Ordering::Relaxed);
                            counters
                                .tokens
                                .fetch_add(u64::from(s.completion_tokens), Ordering::Relaxed);
                        }
                        Err(e) => {
                            counters.error(&e);
                            // Don't spin on a failing server.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        }
        Background {
            stop,
            tasks,
            streaming,
            counters,
            streams: config.background_batch,
            max_tokens: config.background_max_tokens,
            started: Instant::now(),
        }
    }

    /// The counter of background streams that are decoding now.
    pub fn streaming(&self) -> Arc<AtomicU32> {
        self.streaming.clone()
    }

    /// Waits until every background stream decodes, or `limit`; returns how many do. Errors
    /// after this returns count as errors during the measurement.
    pub async fn wait_streaming(&self, limit: Duration) -> u32 {
        let until = Instant::now() + limit;
        while self.streaming.load(Ordering::Relaxed) < self.streams && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.counters.measuring.store(true, Ordering::Relaxed);
        self.streaming.load(Ordering::Relaxed)
    }

    /// Cancels the background streams (dropping them cancels them on the server) and reports.
    pub async fn stop(mut self, streaming_at_start: u32) -> BackgroundReport {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let wall_s = self.started.elapsed().as_secs_f64();
        let tokens = self.counters.tokens.load(Ordering::Relaxed);
        let streamed = self.counters.streamed.load(Ordering::Relaxed);
        let tally = std::mem::take(
            &mut *self
                .counters
                .tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let rate = |n: u64| if wall_s > 0.0 { n as f64 / wall_s } else { 0.0 };
        BackgroundReport {
            streams: self.streams,
            max_tokens: self.max_tokens,
            streaming_at_start,
            completed: self.counters.completed.load(Ordering::Relaxed),
            errors: self.counters.errors.load(Ordering::Relaxed),
            tokens,
            wall_s,
            aggregate_tok_s: rate(tokens),
            error_kinds: tally.kinds,
            error_details: tally.details,
            errors_before_measurement: self
                .counters
                .errors_before_measurement
                .load(Ordering::Relaxed),
            cancelled_at_stop: self.counters.cancelled.load(Ordering::Relaxed),
            tokens_streamed: streamed,
            streamed_tok_s: rate(streamed),
        }
    }
}
