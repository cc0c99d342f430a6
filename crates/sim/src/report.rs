//! Results per policy and latency class, rendered as a text table, markdown or JSON. Only
//! requests arriving after the warm-up count; TTFT runs from the request's first arrival at
//! the gateway to its first token (client resends and migrations included).

use std::fmt::Write;

use super::engine::{PoolUsage, RunResult};
use super::{Micros, PolicyKind, ProfileModel, SimConfig, Trace};
use moe_common::LatencyClass;
use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClassStats {
    pub requests: usize,
    /// Seconds; None when no request of the class got a first token.
    pub ttft_p50: Option<f64>,
    pub ttft_p99: Option<f64>,
    pub placements: u64,
    pub violations: u64,
    pub spills: u64,
    pub replaced: u64,
    pub refused: u64,
    pub failed: usize,
    pub completed: usize,
    /// Requests whose last placement found their conversation in the worker's prefix cache.
    pub prefix_hits: usize,
    /// Neither completed nor given up when the simulation stopped.
    pub unfinished: usize,
}

impl ClassStats {
    fn of(class: LatencyClass, config: &SimConfig, trace: &Trace, run: &RunResult) -> Self {
        let mut s = ClassStats::default();
        let mut ttft: Vec<Micros> = Vec::new();
        for (r, o) in trace.requests.iter().zip(&run.outcomes) {
            if r.class != class || r.at < config.warmup {
                continue;
            }
            s.requests += 1;
            if let Some(t) = o.first_token {
                ttft.push(t - r.at);
            }
            s.placements += o.placements as u64;
            s.violations += o.violations as u64;
            s.spills += o.spills as u64;
            s.replaced += o.replaced as u64;
            s.refused += o.refused as u64;
            s.failed += o.failed as usize;
            s.completed += o.done.is_some() as usize;
            s.prefix_hits += o.prefix_hit as usize;
            s.unfinished += (o.done.is_none() && !o.failed) as usize;
        }
        ttft.sort_unstable();
        s.ttft_p50 = percentile(&ttft, 0.50);
        s.ttft_p99 = percentile(&ttft, 0.99);
        s
    }
}

/// Nearest-rank percentile in seconds.
fn percentile(sorted: &[Micros], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 1e6)
}

#[derive(Clone, Debug)]
pub struct PolicyReport {
    pub policy: PolicyKind,
    pub interactive: ClassStats,
    pub batch: ClassStats,
    /// `full` and `cpu-moe` pools, between the warm-up and the end of arrivals.
    pub usage: [PoolUsage; 2],
    pub decisions: u64,
    /// Mean wall-clock microseconds of one placement decision.
    pub decision_us: f64,
    /// Wall-clock seconds the simulation of this policy took.
    pub wall_s: f64,
}

impl PolicyReport {
    pub fn new(
        policy: PolicyKind,
        config: &SimConfig,
        trace: &Trace,
        run: &RunResult,
        wall_s: f64,
    ) -> Self {
        PolicyReport {
            policy,
            interactive: ClassStats::of(LatencyClass::Interactive, config, trace, run),
            batch: ClassStats::of(LatencyClass::Batch, config, trace, run),
            usage: run.usage,
            decisions: run.decisions,
            decision_us: run.decision_us,
            wall_s,
        }
    }

    fn classes(&self) -> [(&'static str, &ClassStats); 2] {
        [("interactive", &self.interactive), ("batch", &self.batch)]
    }
}

#[derive(Clone, Debug)]
pub struct Report {
    /// Requests in the trace (warm-up included).
    pub requests: usize,
    pub churn_events: usize,
    pub policies: Vec<PolicyReport>,
}

const HEADER: [&str; 13] = [
    "policy",
    "class",
    "requests",
    "TTFT p50 s",
    "TTFT p99 s",
    "headroom violations",
    "spill-overs",
    "re-placed",
    "refused",
    "failed",
    "unfinished",
    "completed",
    "prefix hits %",
];

impl Report {
    fn rows(&self) -> Vec<[String; 13]> {
        let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let mut rows = Vec::new();
        for p in &self.policies {
            for (class, s) in p.classes() {
                rows.push([
                    p.policy.name().to_string(),
                    class.to_string(),
                    s.requests.to_string(),
                    secs(s.ttft_p50),
                    secs(s.ttft_p99),
                    s.violations.to_string(),
                    s.spills.to_string(),
                    s.replaced.to_string(),
                    s.refused.to_string(),
                    s.failed.to_string(),
                    s.unfinished.to_string(),
                    s.completed.to_string(),
                    format!(
                        "{:.1}",
                        100.0 * s.prefix_hits as f64 / s.requests.max(1) as f64
                    ),
                ]);
            }
        }
        rows
    }

    /// Aligned plain-text table.
    pub fn table(&self) -> String {
        let rows = self.rows();
        let widths: Vec<usize> = (0..HEADER.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([HEADER[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let mut line = |cells: Vec<&str>| {
            let parts: Vec<String> = (0..cells.len())
                .map(|i| match i {
                    0 | 1 => format!("{:<w$}", cells[i], w = widths[i]),
                    _ => format!("{:>w$}", cells[i], w = widths[i]),
                })
                .collect();
            let _ = writeln!(out, "{}", parts.join("  ").trim_end());
        };
        line(HEADER.to_vec());
        for r in &rows {
            line(r.iter().map(String::as_str).collect());
        }
        out
    }

    pub fn markdown(&self) -> String {
        let align = "---|".repeat(2) + &"---:|".repeat(HEADER.len() - 2);
        let mut out = format!("| {} |\n|{align}\n", HEADER.join(" | "));
        for r in self.rows() {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }

    /// One line per policy: slot and KV occupancy of each pool, and the cost of a decision.
    pub fn usage(&self) -> String {
        let mut out = String::new();
        for p in &self.policies {
            let [f, c] = p.usage.map(|u| (u.slots * 100.0, u.kv * 100.0));
            let _ = writeln!(
                out,
                "{}: slots / KV in use: full {:.0} % / {:.0} %, cpu-moe {:.0} % / {:.0} %; \
                 load imbalance (busiest worker / mean) full {:.2}, cpu-moe {:.2}; \
                 {} placement decisions, {:.1} µs each (wall clock)",
                p.policy.name(),
                f.0,
                f.1,
                c.0,
                c.1,
                p.usage[0].imbalance,
                p.usage[1].imbalance,
                p.decisions,
                p.decision_us
            );
        }
        out
    }

    fn find(&self, p: PolicyKind) -> Option<&PolicyReport> {
        self.policies.iter().find(|r| r.policy == p)
    }

    /// The targets: interactive p99 TTFT ≤ 0.5 × round-robin's, no headroom violation.
    pub fn targets(&self) -> String {
        let (Some(ours), Some(rr)) = (
            self.find(PolicyKind::Ours),
            self.find(PolicyKind::RoundRobin),
        ) else {
            return "targets: need both ours and round-robin\n".into();
        };
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let mut out = String::new();
        match (ours.interactive.ttft_p99, rr.interactive.ttft_p99) {
            (Some(o), Some(r)) if r > 0.0 => {
                let ratio = o / r;
                let _ = writeln!(
                    out,
                    "target interactive TTFT p99 ≤ 0.5 × round-robin: ours {o:.3} s, \
                     round-robin {r:.3} s, ratio {ratio:.3}: {}",
                    verdict(ratio <= 0.5)
                );
            }
            _ => out.push_str("target interactive TTFT p99: not measurable (no first tokens)\n"),
        }
        let v = ours.interactive.violations + ours.batch.violations;
        let _ = writeln!(
            out,
            "target zero headroom violations: ours {v}: {}",
            verdict(v == 0)
        );
        out
    }

    /// The report and the configuration that produced it as pretty-printed JSON.
    pub fn json(&self, config: &SimConfig) -> String {
        let c = &config.cluster;
        let w = &config.workload;
        let f = &config.front;
        let doc = JsonReport {
            config: JsonConfig {
                seed: config.seed,
                workers: c.workers,
                full_fraction: c.full_fraction,
                rate: w.rate,
                duration_s: w.duration as f64 / 1e6,
                warmup_s: config.warmup as f64 / 1e6,
                interactive_fraction: w.interactive_fraction,
                churn_per_minute: c.churn_per_minute,
                advert_interval_ms: c.advert_interval as f64 / 1e3,
                advert_free_kv: format!("{:?}", c.advert_free_kv),
                worker_queue: format!("{:?}", c.queue),
                max_queue: c.max_queue,
                gateways: f.gateways,
                sample_k: f.sample_k,
                conversations: w.conversations,
                prefix_share: w.prefix_share,
                prefix_cache: c.prefix_cache,
                max_attempts: f.max_attempts,
                client_retries: f.client_retries,
                client_backoff_s: f.client_backoff as f64 / 1e6,
                full: JsonProfile::of(&c.full),
                cpu_moe: JsonProfile::of(&c.cpu_moe),
            },
            requests: self.requests,
            churn_events: self.churn_events,
            results: self
                .policies
                .iter()
                .flat_map(|p| p.classes().map(|(class, s)| JsonRow::of(p, class, s)))
                .collect(),
        };
        let mut out = serde_json::to_string_pretty(&doc).expect("plain data serializes");
        out.push('\n');
        out
    }
}

#[derive(Serialize)]
struct JsonReport {
    config: JsonConfig,
    requests: usize,
    churn_events: usize,
    results: Vec<JsonRow>,
}

#[derive(Serialize)]
struct JsonConfig {
    seed: u64,
    workers: usize,
    full_fraction: f64,
    rate: f64,
    duration_s: f64,
    warmup_s: f64,
    interactive_fraction: f64,
    churn_per_minute: f64,
    advert_interval_ms: f64,
    advert_free_kv: String,
    worker_queue: String,
    max_queue: usize,
    gateways: usize,
    sample_k: usize,
    conversations: u64,
    prefix_share: f64,
    prefix_cache: usize,
    max_attempts: u32,
    client_retries: u32,
    client_backoff_s: f64,
    full: JsonProfile,
    cpu_moe: JsonProfile,
}

#[derive(Serialize)]
struct JsonProfile {
    kv_tokens: u32,
    max_sequences: u32,
    step_base_ms: f64,
    step_per_seq_ms: f64,
    prefill_tps: f64,
    step_tokens: u32,
}

impl JsonProfile {
    fn of(m: &ProfileModel) -> Self {
        JsonProfile {
            kv_tokens: m.kv_tokens,
            max_sequences: m.max_sequences,
            step_base_ms: m.step_base_s * 1e3,
            step_per_seq_ms: m.step_per_seq_s * 1e3,
            prefill_tps: m.prefill_tps,
            step_tokens: m.step_tokens,
        }
    }
}

#[derive(Serialize)]
struct JsonRow {
    policy: &'static str,
    class: &'static str,
    requests: usize,
    ttft_p50_s: Option<f64>,
    ttft_p99_s: Option<f64>,
    placements: u64,
    headroom_violations: u64,
    spill_overs: u64,
    replaced: u64,
    refused: u64,
    failed: usize,
    unfinished: usize,
    completed: usize,
    prefix_hits: usize,
    full_imbalance: f64,
    cpu_moe_imbalance: f64,
    full_slots_used: f64,
    full_kv_used: f64,
    cpu_moe_slots_used: f64,
    cpu_moe_kv_used: f64,
    decisions: u64,
    decision_us: f64,
    wall_s: f64,
}

impl JsonRow {
    fn of(p: &PolicyReport, class: &'static str, s: &ClassStats) -> Self {
        let [full, cpu] = p.usage;
        JsonRow {
            policy: p.policy.name(),
            class,
            requests: s.requests,
            ttft_p50_s: s.ttft_p50,
            ttft_p99_s: s.ttft_p99,
            placements: s.placements,
            headroom_violations: s.violations,
            spill_overs: s.spills,
            replaced: s.replaced,
            refused: s.refused,
            failed: s.failed,
            unfinished: s.unfinished,
            completed: s.completed,
            prefix_hits: s.prefix_hits,
            full_imbalance: full.imbalance,
            cpu_moe_imbalance: cpu.imbalance,
            full_slots_used: full.slots,
            full_kv_used: full.kv,
            cpu_moe_slots_used: cpu.slots,
            cpu_moe_kv_used: cpu.kv,
            decisions: p.decisions,
            decision_us: p.decision_us,
            wall_s: p.wall_s,
        }
    }
}
