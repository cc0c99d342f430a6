//! `moe-sim`: runs the gateway's placement policy against a simulated cluster in virtual time and
//! compares it with round-robin and least-loaded. Parse flags (exit 64 on bad ones), simulate,
//! print the table, optionally write JSON and markdown.

use std::path::PathBuf;

use clap::Parser;
use moe_sim::{
    AdvertFreeKv, ClassShape, ClusterModel, FrontModel, PolicyKind, ProfileModel, QueueDiscipline,
    SimConfig, Workload, micros,
};

/// Discrete-event simulation of moe-cluster placement: the real `scheduler::rank` against
/// round-robin and least-loaded, on one request trace and worker set.
#[derive(Debug, Parser)]
#[command(name = "moe-sim", version, about)]
struct Args {
    /// Seed of every random draw (trace, workers, churn, tie-breaks).
    #[arg(long, env = "MOE_SIM_SEED", default_value_t = 1)]
    seed: u64,
    /// Workers at the start.
    #[arg(long, env = "MOE_SIM_WORKERS", default_value_t = 1000)]
    workers: usize,
    /// Share of `full` workers; the rest are `cpu-moe`.
    #[arg(long, env = "MOE_SIM_FULL_FRACTION", default_value_t = 0.3)]
    full_fraction: f64,
    /// Overrides of the full profile: kv=…,slots=…,base_ms=…,per_seq_ms=…,prefill_tps=…,step_tokens=….
    #[arg(long, env = "MOE_SIM_FULL_MODEL", default_value = "")]
    full_model: String,
    /// Overrides of the cpu-moe profile, same keys.
    #[arg(long, env = "MOE_SIM_CPU_MOE_MODEL", default_value = "")]
    cpu_moe_model: String,
    /// Admission order at a worker: fifo or interactive-first (moe-worker's own order).
    #[arg(long, env = "MOE_SIM_WORKER_QUEUE", default_value = "fifo")]
    worker_queue: QueueDiscipline,
    /// Requests a worker queues at most before refusing (moe-worker --max-queue).
    #[arg(long, env = "MOE_SIM_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Share of workers leaving per simulated minute (as many join).
    #[arg(long, env = "MOE_SIM_CHURN_PER_MINUTE", default_value_t = 0.01)]
    churn_per_minute: f64,
    /// How often a worker's advert is refreshed, in milliseconds.
    #[arg(long, env = "MOE_SIM_ADVERT_INTERVAL_MS", default_value_t = 250)]
    advert_interval_ms: u64,
    /// What adverts count as free KV: unclaimed (moe-worker: minus admitted and queued
    /// requests) or admitted (a what-if: the older advert, minus admitted requests only).
    #[arg(long, env = "MOE_SIM_ADVERT_FREE_KV", default_value = "unclaimed")]
    advert_free_kv: AdvertFreeKv,
    /// Mean request arrivals per second (Poisson). The default loads the modelled 1000 workers
    /// moderately: they saturate near 800–1000 req/s, so the 10,000 is pure overload.
    #[arg(long, env = "MOE_SIM_RATE", default_value_t = 500.0)]
    rate: f64,
    /// Seconds of virtual time with arrivals.
    #[arg(long, env = "MOE_SIM_DURATION", default_value_t = 90.0)]
    duration: f64,
    /// Seconds at the start whose requests are simulated but not counted.
    #[arg(long, env = "MOE_SIM_WARMUP", default_value_t = 30.0)]
    warmup: f64,
    /// Seconds after the last arrival the cluster may take to finish.
    #[arg(long, env = "MOE_SIM_DRAIN", default_value_t = 600.0)]
    drain: f64,
    /// Share of INTERACTIVE requests.
    #[arg(long, env = "MOE_SIM_INTERACTIVE_FRACTION", default_value_t = 0.3)]
    interactive_fraction: f64,
    /// Interactive prompt tokens, MIN-MAX (uniform).
    #[arg(long, env = "MOE_SIM_INTERACTIVE_PROMPT", default_value = "200-1000", value_parser = parse_range)]
    interactive_prompt: (u32, u32),
    #[arg(long, env = "MOE_SIM_INTERACTIVE_MAX_TOKENS", default_value_t = 128)]
    interactive_max_tokens: u32,
    /// Batch prompt tokens, MIN-MAX (uniform).
    #[arg(long, env = "MOE_SIM_BATCH_PROMPT", default_value = "500-2000", value_parser = parse_range)]
    batch_prompt: (u32, u32),
    #[arg(long, env = "MOE_SIM_BATCH_MAX_TOKENS", default_value_t = 256)]
    batch_max_tokens: u32,
    /// Requests continue this many conversations (chosen uniformly); 0: every request starts
    /// its own. A worker that served a conversation before has part of its prompt cached.
    #[arg(long, env = "MOE_SIM_CONVERSATIONS", default_value_t = 0)]
    conversations: u64,
    /// Share of the prompt a prefix-cache hit skips in prefill.
    #[arg(long, env = "MOE_SIM_PREFIX_SHARE", default_value_t = 0.8)]
    prefix_share: f64,
    /// Conversations a worker's prefix cache holds (least recently used leave first).
    #[arg(long, env = "MOE_SIM_PREFIX_CACHE", default_value_t = 64)]
    prefix_cache: usize,
    /// Gateways sharing the cluster, each knowing only its own reservations.
    #[arg(long, env = "MOE_SIM_GATEWAYS", default_value_t = 1)]
    gateways: usize,
    /// Workers the sampled policies (ours, prefix) draw per first placement.
    #[arg(long, env = "MOE_SIM_SAMPLE_K", default_value_t = 4)]
    sample_k: usize,
    /// Workers tried per placement (gateway --max-attempts).
    #[arg(long, env = "MOE_SIM_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// Times a client sends a refused request again before giving up.
    #[arg(long, env = "MOE_SIM_CLIENT_RETRIES", default_value_t = 30)]
    client_retries: u32,
    /// Milliseconds a client waits before sending a refused request again.
    #[arg(long, env = "MOE_SIM_CLIENT_BACKOFF_MS", default_value_t = 1000)]
    client_backoff_ms: u64,
    /// Policies to run (comma-separated).
    #[arg(
        long,
        env = "MOE_SIM_POLICIES",
        value_delimiter = ',',
        default_value = "ours,round-robin,least-loaded"
    )]
    policies: Vec<PolicyKind>,
    /// Also write the results as JSON here.
    #[arg(long, env = "MOE_SIM_JSON")]
    json: Option<PathBuf>,
    /// Also write the table (and the targets) as markdown here.
    #[arg(long, env = "MOE_SIM_MARKDOWN")]
    markdown: Option<PathBuf>,
}

fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not MIN-MAX"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{v:?} is not a whole number"))
    };
    Ok((parse(a)?, parse(b)?))
}

impl Args {
    fn config(&self) -> Result<SimConfig, String> {
        let full = ProfileModel::full()
            .with_overrides(&self.full_model)
            .map_err(|e| format!("--full-model: {e}"))?;
        let cpu_moe = ProfileModel::cpu_moe()
            .with_overrides(&self.cpu_moe_model)
            .map_err(|e| format!("--cpu-moe-model: {e}"))?;
        if !(self.duration > 0.0 && self.warmup >= 0.0 && self.drain >= 0.0) {
            return Err("--duration must be positive, --warmup and --drain not negative".into());
        }
        if self.policies.is_empty() {
            return Err("--policies needs at least one policy".into());
        }
        let config = SimConfig {
            seed: self.seed,
            cluster: ClusterModel {
                workers: self.workers,
                full_fraction: self.full_fraction,
                full,
                cpu_moe,
                queue: self.worker_queue,
                max_queue: self.max_queue,
                churn_per_minute: self.churn_per_minute,
                advert_interval: self.advert_interval_ms * 1000,
                advert_free_kv: self.advert_free_kv,
                prefix_cache: self.prefix_cache,
            },
            front: FrontModel {
                gateways: self.gateways,
                max_attempts: self.max_attempts,
                client_retries: self.client_retries,
                client_backoff: self.client_backoff_ms * 1000,
                sample_k: self.sample_k,
            },
            workload: Workload {
                rate: self.rate,
                duration: micros(self.duration),
                interactive_fraction: self.interactive_fraction,
                interactive: ClassShape {
                    prompt_min: self.interactive_prompt.0,
                    prompt_max: self.interactive_prompt.1,
                    max_tokens: self.interactive_max_tokens,
                },
                batch: ClassShape {
                    prompt_min: self.batch_prompt.0,
                    prompt_max: self.batch_prompt.1,
                    max_tokens: self.batch_max_tokens,
                },
                conversations: self.conversations,
                prefix_share: self.prefix_share,
            },
            warmup: micros(self.warmup),
            drain: micros(self.drain),
        };
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("moe-sim: {e}");
            std::process::exit(64);
        }
    };
    let report = moe_sim::run(&config, &args.policies);
    println!(
        "{} requests ({} counted after a {:.0} s warm-up per policy below), {} churn events, seed {}",
        report.requests,
        report
            .policies
            .first()
            .map_or(0, |p| p.interactive.requests + p.batch.requests),
        args.warmup,
        report.churn_events,
        args.seed
    );
    print!("{}", report.table());
    print!("{}", report.usage());
    print!("{}", report.targets());
    for p in &report.policies {
        eprintln!(
            "moe-sim: {} simulated in {:.1} s wall",
            p.policy.name(),
            p.wall_s
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, report.json(&config))?;
    }
    if let Some(path) = &args.markdown {
        let bullets = |text: String| text.lines().map(|l| format!("- {l}\n")).collect::<String>();
        let text = format!(
            "{}\n{}{}",
            report.markdown(),
            bullets(report.usage()),
            bullets(report.targets())
        );
        std::fs::write(path, text)?;
    }
    Ok(())
}
