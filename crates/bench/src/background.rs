//! Background BATCH load: K loops that keep one BATCH stream each running on the gRPC target
//! while interactive levels are measured. Bounded in requests per loop and in time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::config::BenchConfig;
use crate::report::BackgroundReport;
use moe_common::LatencyClass;

/// At most this many requests per background loop.
const MAX_REQUESTS_PER_LOOP: u64 = 10_000;

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    errors: AtomicU64,
    tokens: AtomicU64,
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
                    let spec =
                        super::spec(&config, LatencyClass::Batch, index, Some(streaming.clone()));
                    let outcome = tokio::select! {
                        r = client.generate(&spec, config.request_timeout) => r,
                        () = stop.cancelled() => return,
                    };
                    match outcome {
                        Ok(s) => {
                            counters.completed.fetch_add(1, Ordering::Relaxed);
                            counters
                                .tokens
                                .fetch_add(u64::from(s.completion_tokens), Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.errors.fetch_add(1, Ordering::Relaxed);
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

    /// Waits until every background stream decodes, or `limit`; returns how many do.
    pub async fn wait_streaming(&self, limit: Duration) -> u32 {
        let until = Instant::now() + limit;
        while self.streaming.load(Ordering::Relaxed) < self.streams && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.streaming.load(Ordering::Relaxed)
    }

    /// Cancels the background streams (dropping them cancels them on the server) and reports.
    pub async fn stop(mut self, streaming_at_start: u32) -> BackgroundReport {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        let wall_s = self.started.elapsed().as_secs_f64();
        let tokens = self.counters.tokens.load(Ordering::Relaxed);
        BackgroundReport {
            streams: self.streams,
            max_tokens: self.max_tokens,
            streaming_at_start,
            completed: self.counters.completed.load(Ordering::Relaxed),
            errors: self.counters.errors.load(Ordering::Relaxed),
            tokens,
            wall_s,
            aggregate_tok_s: if wall_s > 0.0 {
                tokens as f64 / wall_s
            } else {
                0.0
            },
        }
    }
}
