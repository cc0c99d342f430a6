//! moe-bench: a bounded load generator for moe.v1 gRPC endpoints (workers, gateways) and for
//! upstream llama-server, used by the side-by-side scripts under `bench/`.

pub mod chat;
pub mod client;
pub mod config;
pub mod prompt;
pub mod report;
pub mod target;

mod background;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::background::Background;
use crate::client::{BenchError, Client, RequestSpec};
use crate::config::BenchConfig;
use crate::report::{LevelAccumulator, LevelReport, Report};
use moe_common::LatencyClass;

/// Prompt indexes of different phases never overlap, so no prompt is sent twice.
const INDEX_STRIDE: u64 = 1_000_000;

/// Connects, warms up, measures every level (and, with `--background-batch`, every level again
/// under background BATCH load), and returns the report.
pub async fn run(config: &BenchConfig, cancel: CancellationToken) -> Result<Report, BenchError> {
    let client = connect(config, &cancel).await?;
    wait_ready(&client, config, &cancel).await?;
    for i in 1..config.warmup {
        let spec = spec(
            config,
            config.class,
            INDEX_STRIDE * 999 + u64::from(i),
            None,
        );
        client.generate(&spec, config.request_timeout).await?;
    }
    let mut levels = Vec::new();
    for (n, &c) in config.concurrency.iter().enumerate() {
        let plan = LevelPlan {
            concurrency: c,
            first_index: INDEX_STRIDE * n as u64,
            background: None,
        };
        levels.push(run_level(&client, config, &plan, &cancel).await);
    }
    let mut under_background = Vec::new();
    let mut background = None;
    if config.background_batch > 0 && !cancel.is_cancelled() {
        let bg = Background::start(&client, config, &cancel);
        let streaming_at_start = bg.wait_streaming(config.request_timeout).await;
        for (n, &c) in config.concurrency.iter().enumerate() {
            let plan = LevelPlan {
                concurrency: c,
                first_index: INDEX_STRIDE * (100 + n as u64),
                background: Some(bg.streaming()),
            };
            under_background.push(run_level(&client, config, &plan, &cancel).await);
        }
        background = Some(bg.stop(streaming_at_start).await);
    }
    Ok(Report {
        label: config.label.clone(),
        target: config.target.to_string(),
        class: config.class,
        prompt_tokens_requested: config.prompt_tokens,
        max_tokens: config.max_tokens,
        requests_per_level: config.requests_per_level,
        levels,
        under_background,
        background,
    })
}

/// Retries the first connection for up to 30 s (servers may still be binding).
async fn connect(config: &BenchConfig, cancel: &CancellationToken) -> Result<Client, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(&config.target).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline || cancel.is_cancelled() => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Sends the first warm-up request (or a one-token probe without warm-up) until one succeeds.
async fn wait_ready(
    client: &Client,
    config: &BenchConfig,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + config.wait_ready;
    let mut probe = spec(config, config.class, INDEX_STRIDE * 999, None);
    if config.warmup == 0 {
        probe.max_tokens = 1;
    }
    loop {
        match client.generate(&probe, config.request_timeout).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline || cancel.is_cancelled() => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn spec(
    config: &BenchConfig,
    class: LatencyClass,
    index: u64,
    streaming: Option<Arc<AtomicU32>>,
) -> RequestSpec {
    let max_tokens = match class {
        LatencyClass::Batch if streaming.is_some() => config.background_max_tokens,
        _ => config.max_tokens,
    };
    RequestSpec {
        prompt: prompt::build(config.prompt_tokens, index),
        max_tokens,
        class,
        streaming,
        received: None,
    }
}

struct LevelPlan {
    concurrency: u32,
    first_index: u64,
    /// Counter of decoding background streams, sampled as each request is sent.
    background: Option<Arc<AtomicU32>>,
}

/// `concurrency` loops pull request numbers from a shared counter until the level's requests
/// are sent, its time is up or the run is cancelled; each request has its own timeout.
async fn run_level(
    client: &Client,
    config: &BenchConfig,
    plan: &LevelPlan,
    cancel: &CancellationToken,
) -> LevelReport {
    let requests = config.requests_per_level.max(plan.concurrency);
    let next = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let deadline = started + config.level_timeout;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.concurrency {
        let (client, next, cancel) = (client.clone(), next.clone(), cancel.clone());
        let background = plan.background.clone();
        let (config, first_index) = (config.clone(), plan.first_index);
        tasks.spawn(async move {
            let mut acc = LevelAccumulator::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests || Instant::now() >= deadline || cancel.is_cancelled() {
                    return acc;
                }
                if let Some(bg) = &background {
                    acc.background_streaming(bg.load(Ordering::Relaxed));
                }
                let spec = spec(&config, config.class, first_index + u64::from(i), None);
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_secs(1));
                let outcome = tokio::select! {
                    r = client.generate(&spec, config.request_timeout.min(left)) => r,
                    () = cancel.cancelled() => return acc,
                };
                acc.record(outcome);
            }
        });
    }
    let mut merged = LevelAccumulator::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok(acc) = done {
            merged.merge(acc);
        }
    }
    if let Some(e) = merged.first_error() {
        eprintln!("moe-bench: level {}: first error: {e}", plan.concurrency);
    }
    merged.finish(plan.concurrency, requests, started, started.elapsed())
}
