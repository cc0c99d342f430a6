//! A discrete-event simulator that drives the real placement policy ([`moe_gateway::scheduler::rank`])
//! against modelled workers in virtual time, next to round-robin and least-loaded baselines, on
//! the identical request trace, worker set and churn. Deterministic for a given seed.
//!
//! - [`worker`]: the modelled worker (continuous batching, KV reservations, step times).
//! - [`trace`]: the inputs every policy shares (requests, initial workers, churn).
//! - `engine`: the event loop, stale adverts, reservations, re-placement after churn.
//! - `baseline`: round-robin and least-loaded.
//! - [`report`]: per-policy, per-class results as a table, markdown or JSON.

mod baseline;
mod engine;
pub mod report;
pub mod trace;
pub mod worker;

use std::time::Instant;

pub use engine::{Outcome, PoolUsage, RunResult};
pub use report::{ClassStats, PolicyReport, Report};
pub use trace::{ClassShape, Trace, Workload};
pub use worker::{Profile, ProfileModel, QueueDiscipline};

/// Virtual time in microseconds.
pub type Micros = u64;

pub fn micros(seconds: f64) -> Micros {
    (seconds * 1e6).round().max(0.0) as Micros
}

/// The placement policies compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// `scheduler::rank` with the default `Policy` (sampled first placements), tried like the
    /// proxy does.
    Ours,
    /// `scheduler::rank` with `Sampling::FullScan`: every worker scored and sorted (the policy
    /// before issue 17).
    OursScan,
    /// `scheduler::affinity::rank_with_prefix` keyed by the request's conversation: the default
    /// policy plus rendezvous prefix affinity bounded by load (never on the live path).
    Prefix,
    /// `scheduler::affinity::rank_with_hits`, the live prefix-aware policy (`--prefix-routing
    /// on`): every worker holding the conversation in its prefix cache is a hit of
    /// `prompt × prefix_share` tokens (what the gateway's prefix index reports from the
    /// workers' cache events; every gateway sees the same), ties by the conversation's key.
    Hits,
    /// Next ready worker in turn; ignores class and headroom.
    RoundRobin,
    /// Fewest active + queued streams (advert plus this gateway's placements since); ignores
    /// class and headroom.
    LeastLoaded,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Ours,
        PolicyKind::OursScan,
        PolicyKind::Prefix,
        PolicyKind::Hits,
        PolicyKind::RoundRobin,
        PolicyKind::LeastLoaded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Ours => "ours",
            PolicyKind::OursScan => "ours-scan",
            PolicyKind::Prefix => "prefix",
            PolicyKind::Hits => "hits",
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::LeastLoaded => "least-loaded",
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PolicyKind::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "policy must be ours, ours-scan, prefix, hits, round-robin or least-loaded, not {s:?}"
                )
            })
    }
}

/// Workers and their behaviour.
#[derive(Clone, Debug)]
pub struct ClusterModel {
    /// Workers at the start (churn keeps the count about level).
    pub workers: usize,
    /// Share of workers with the `full` profile; the rest are `cpu-moe`.
    pub full_fraction: f64,
    pub full: ProfileModel,
    pub cpu_moe: ProfileModel,
    pub queue: QueueDiscipline,
    /// Requests a worker queues at most; more are refused (like `--max-queue`).
    pub max_queue: usize,
    /// Share of workers leaving per simulated minute (as many join).
    pub churn_per_minute: f64,
    /// A worker's advert is refreshed this often (the gateway sees nothing newer).
    pub advert_interval: Micros,
    /// What an advert's `free_kv_tokens` counts.
    pub advert_free_kv: AdvertFreeKv,
    /// Conversations each worker's prefix cache holds (least recently used leaves first).
    pub prefix_cache: usize,
}

/// What a worker advertises as free KV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvertFreeKv {
    /// What-if (moe-worker before commit 58a3ad8): KV not reserved by admitted sequences.
    Admitted,
    /// KV not reserved by admitted sequences nor claimed by queued requests: what `moe-worker`
    /// advertises.
    Unclaimed,
}

impl std::str::FromStr for AdvertFreeKv {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admitted" => Ok(AdvertFreeKv::Admitted),
            "unclaimed" => Ok(AdvertFreeKv::Unclaimed),
            _ => Err(format!(
                "advert free KV must be admitted or unclaimed, not {s:?}"
            )),
        }
    }
}

/// How the gateway(s) and clients behave around the policy.
#[derive(Clone, Debug)]
pub struct FrontModel {
    /// Gateways sharing the cluster, each seeing only its own reservations; request i goes
    /// through gateway i mod N.
    pub gateways: usize,
    /// Workers tried per placement (the proxy's `--max-attempts`).
    pub max_attempts: u32,
    /// A refused request is sent again by its client this many times at most...
    pub client_retries: u32,
    /// ... after this long each time.
    pub client_backoff: Micros,
    /// Workers the sampled policies draw per first placement (`Sampling::PowerOfK`'s k).
    pub sample_k: usize,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub cluster: ClusterModel,
    pub front: FrontModel,
    pub workload: Workload,
    /// Requests arriving before this are simulated but not counted.
    pub warmup: Micros,
    /// After the last arrival, how long to let the cluster finish at most.
    pub drain: Micros,
}

impl SimConfig {
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.cluster;
        if c.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&c.full_fraction) {
            return Err("--full-fraction must be within 0..=1".into());
        }
        if !(c.churn_per_minute >= 0.0 && c.churn_per_minute < 1.0) {
            return Err("--churn-per-minute must be within 0..1".into());
        }
        if c.advert_interval == 0 {
            return Err("--advert-interval-ms must be positive".into());
        }
        if self.front.gateways == 0 || self.front.max_attempts == 0 {
            return Err("--gateways and --max-attempts must be at least 1".into());
        }
        if self.warmup >= self.workload.duration {
            return Err("--warmup must be shorter than --duration".into());
        }
        c.full
            .validate()
            .map_err(|e| format!("--full-model: {e}"))?;
        c.cpu_moe
            .validate()
            .map_err(|e| format!("--cpu-moe-model: {e}"))?;
        self.workload.validate()
    }
}

/// Generates the shared trace once and runs every policy on it, one thread each.
pub fn run(config: &SimConfig, policies: &[PolicyKind]) -> Report {
    let trace = Trace::generate(config);
    let results: Vec<PolicyReport> = std::thread::scope(|s| {
        let handles: Vec<_> = policies
            .iter()
            .map(|&p| {
                let trace = &trace;
                s.spawn(move || {
                    let started = Instant::now();
                    let result = engine::simulate(config, trace, p);
                    let wall_s = started.elapsed().as_secs_f64();
                    PolicyReport::new(p, config, trace, &result, wall_s)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("simulation thread"))
            .collect()
    });
    Report {
        requests: trace.requests.len(),
        churn_events: trace.churn.len(),
        policies: results,
    }
}
