//! Per-level summaries (percentiles, rates) and the printed table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::client::{BenchError, Sample};

/// Nearest-rank percentile of sorted values (`p` in 0..=100). With few samples p99 is the max.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// One level's outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LevelReport {
    pub concurrency: u32,
    /// Requests the level meant to send.
    pub requests: u32,
    pub ok: u32,
    pub errors: u32,
    pub error_kinds: BTreeMap<String, u32>,
    /// Requests not sent because the level ran out of time or was cancelled.
    pub skipped: u32,
    pub ttft_ms_p50: Option<f64>,
    pub ttft_ms_p99: Option<f64>,
    pub ttft_ms_mean: Option<f64>,
    /// Mean over requests of (tokens − 1) / (last token − first token).
    pub decode_tok_s_per_stream_mean: Option<f64>,
    /// Generated tokens of the level / wall time of the level.
    pub aggregate_tok_s: f64,
    pub wall_s: f64,
    pub completion_tokens_total: u64,
    pub completion_tokens_mean: Option<f64>,
    /// Prompt tokens as counted by the server.
    pub prompt_tokens_mean: Option<f64>,
    /// Background streams decoding when each measured request was sent (mean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background_streaming_mean: Option<f64>,
}

/// Collects one level's outcomes.
#[derive(Debug, Default)]
pub struct LevelAccumulator {
    samples: Vec<Sample>,
    errors: BTreeMap<String, u32>,
    first_error: Option<String>,
    background_seen: Vec<f64>,
}

impl LevelAccumulator {
    pub fn record(&mut self, outcome: Result<Sample, BenchError>) {
        match outcome {
            Ok(s) => self.samples.push(s),
            Err(e) => {
                *self.errors.entry(e.kind()).or_default() += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    pub fn merge(&mut self, other: LevelAccumulator) {
        self.samples.extend(other.samples);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.background_seen.extend(other.background_seen);
    }

    pub fn background_streaming(&mut self, n: u32) {
        self.background_seen.push(f64::from(n));
    }

    pub fn first_error(&self) -> Option<&str> {
        self.first_error.as_deref()
    }

    pub fn finish(self, concurrency: u32, requests: u32, wall: Duration) -> LevelReport {
        let mut ttft: Vec<f64> = self
            .samples
            .iter()
            .map(|s| s.ttft.as_secs_f64() * 1e3)
            .collect();
        ttft.sort_by(f64::total_cmp);
        let decode: Vec<f64> = self
            .samples
            .iter()
            .filter_map(Sample::decode_tokens_per_second)
            .collect();
        let completion: Vec<f64> = self
            .samples
            .iter()
            .map(|s| f64::from(s.completion_tokens))
            .collect();
        let prompt: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| s.prompt_tokens.map(f64::from))
            .collect();
        let total: u64 = self
            .samples
            .iter()
            .map(|s| u64::from(s.completion_tokens))
            .sum();
        let ok = self.samples.len() as u32;
        let errors = self.errors.values().sum::<u32>();
        let wall_s = wall.as_secs_f64();
        LevelReport {
            concurrency,
            requests,
            ok,
            errors,
            error_kinds: self.errors,
            skipped: requests.saturating_sub(ok + errors),
            ttft_ms_p50: percentile(&ttft, 50.0),
            ttft_ms_p99: percentile(&ttft, 99.0),
            ttft_ms_mean: mean(&ttft),
            decode_tok_s_per_stream_mean: mean(&decode),
            aggregate_tok_s: if wall_s > 0.0 {
                total as f64 / wall_s
            } else {
                0.0
            },
            wall_s,
            completion_tokens_total: total,
            completion_tokens_mean: mean(&completion),
            prompt_tokens_mean: mean(&prompt),
            background_streaming_mean: mean(&self.background_seen),
        }
    }
}

/// What the background BATCH load did while levels were measured under it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BackgroundReport {
    pub streams: u32,
    pub max_tokens: u32,
    /// Background streams decoding when measurement began.
    pub streaming_at_start: u32,
    pub completed: u64,
    pub errors: u64,
    pub tokens: u64,
    pub wall_s: f64,
    pub aggregate_tok_s: f64,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub label: String,
    pub target: String,
    pub class: moe_common::LatencyClass,
    pub prompt_tokens_requested: u32,
    pub max_tokens: u32,
    pub requests_per_level: u32,
    pub levels: Vec<LevelReport>,
    /// The same levels measured while `background` ran (empty without `--background-batch`).
    pub under_background: Vec<LevelReport>,
    pub background: Option<BackgroundReport>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

fn rows(out: &mut String, levels: &[LevelReport]) {
    let _ = writeln!(
        out,
        "{:>5} {:>9} {:>10} {:>10} {:>13} {:>12} {:>8} {:>8}",
        "conc", "ok/err", "TTFT p50", "TTFT p99", "decode tok/s", "aggr tok/s", "prompt", "gen"
    );
    for l in levels {
        let _ = writeln!(
            out,
            "{:>5} {:>9} {:>10} {:>10} {:>13} {:>12.1} {:>8} {:>8}",
            l.concurrency,
            format!("{}/{}", l.ok, l.errors + l.skipped),
            opt(l.ttft_ms_p50, 1),
            opt(l.ttft_ms_p99, 1),
            opt(l.decode_tok_s_per_stream_mean, 1),
            l.aggregate_tok_s,
            opt(l.prompt_tokens_mean, 0),
            opt(l.completion_tokens_mean, 0),
        );
    }
}

impl Report {
    /// Human-readable summary (TTFT in ms; decode is per stream, after the first token).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# {} {} class={:?} prompt≈{} max_tokens={} requests/level={}",
            self.label,
            self.target,
            self.class,
            self.prompt_tokens_requested,
            self.max_tokens,
            self.requests_per_level
        );
        rows(&mut out, &self.levels);
        if let Some(bg) = &self.background {
            let _ = writeln!(
                out,
                "# under {} BATCH streams ({} decoding at start; background {:.1} tok/s, {} done, {} errors)",
                bg.streams, bg.streaming_at_start, bg.aggregate_tok_s, bg.completed, bg.errors
            );
            rows(&mut out, &self.under_background);
            for (idle, busy) in self.levels.iter().zip(&self.under_background) {
                let ratio = |a: Option<f64>, b: Option<f64>| opt(a.zip(b).map(|(a, b)| b / a), 2);
                let _ = writeln!(
                    out,
                    "# conc {}: TTFT p50 x{} p99 x{} of idle (target ≤ 2)",
                    idle.concurrency,
                    ratio(idle.ttft_ms_p50, busy.ttft_ms_p50),
                    ratio(idle.ttft_ms_p99, busy.ttft_ms_p99)
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[3.0, 7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn level_rates_come_from_samples() {
        let mut acc = LevelAccumulator::default();
        for ms in [100, 200] {
            acc.record(Ok(Sample {
                ttft: Duration::from_millis(ms),
                decode: Duration::from_secs(1),
                completion_tokens: 11,
                prompt_tokens: Some(128),
            }));
        }
        acc.record(Err(BenchError::NoTokens));
        let l = acc.finish(2, 4, Duration::from_secs(2));
        assert_eq!((l.ok, l.errors, l.skipped), (2, 1, 1));
        assert_eq!(l.decode_tok_s_per_stream_mean, Some(10.0));
        assert_eq!(l.aggregate_tok_s, 11.0);
        assert_eq!(l.ttft_ms_p50, Some(100.0));
    }
}
