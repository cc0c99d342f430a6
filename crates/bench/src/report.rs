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

/// At most this many distinct error details are listed; errors with further details are
/// counted under [`OTHER_DETAILS`].
pub const MAX_ERROR_DETAILS: usize = 32;
/// Where errors beyond [`MAX_ERROR_DETAILS`] distinct details are counted.
pub const OTHER_DETAILS: &str = "other: more distinct errors than are listed";

/// Errors counted per kind (`BenchError::kind`) and per detail (`BenchError::detail`: the kind
/// and a short message, e.g. the gRPC status code and what the server said).
#[derive(Clone, Debug, Default)]
pub struct ErrorTally {
    pub kinds: BTreeMap<String, u64>,
    pub details: BTreeMap<String, u64>,
}

impl ErrorTally {
    pub fn record(&mut self, e: &BenchError) {
        *self.kinds.entry(e.kind()).or_default() += 1;
        self.add_detail(e.detail(), 1);
    }

    fn add_detail(&mut self, detail: String, n: u64) {
        let key = if self.details.contains_key(&detail) || self.details.len() < MAX_ERROR_DETAILS {
            detail
        } else {
            OTHER_DETAILS.to_string()
        };
        *self.details.entry(key).or_default() += n;
    }

    pub fn merge(&mut self, other: ErrorTally) {
        for (k, v) in other.kinds {
            *self.kinds.entry(k).or_default() += v;
        }
        for (k, v) in other.details {
            self.add_detail(k, v);
        }
    }

    pub fn total(&self) -> u64 {
        self.kinds.values().sum()
    }
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
    /// Errors per distinct kind and short message (`kind: message`), e.g.
    /// `grpc_resourceexhausted: gateway is reading as many requests as …`.
    pub error_details: BTreeMap<String, u32>,
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
    /// Every completed request, in the order sent: when a level's numbers are off, which
    /// requests were slow, and when.
    pub timings: Vec<RequestTiming>,
}

/// One completed request of a level.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestTiming {
    /// Sent this long after the level started.
    pub sent_ms: f64,
    pub ttft_ms: f64,
    /// First → last generated token.
    pub decode_ms: f64,
    pub completion_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
}

/// Collects one level's outcomes.
#[derive(Debug, Default)]
pub struct LevelAccumulator {
    samples: Vec<Sample>,
    errors: ErrorTally,
    first_error: Option<String>,
    background_seen: Vec<f64>,
}

impl LevelAccumulator {
    pub fn record(&mut self, outcome: Result<Sample, BenchError>) {
        match outcome {
            Ok(s) => self.samples.push(s),
            Err(e) => {
                self.errors.record(&e);
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    pub fn merge(&mut self, other: LevelAccumulator) {
        self.samples.extend(other.samples);
        self.errors.merge(other.errors);
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

    /// The level's report; `started` is when the level began (request timings are relative to
    /// it), `wall` how long it ran.
    pub fn finish(
        self,
        concurrency: u32,
        requests: u32,
        started: tokio::time::Instant,
        wall: Duration,
    ) -> LevelReport {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut timings: Vec<RequestTiming> = self
            .samples
            .iter()
            .map(|s| RequestTiming {
                sent_ms: ms(s.sent.saturating_duration_since(started)),
                ttft_ms: ms(s.ttft),
                decode_ms: ms(s.decode),
                completion_tokens: s.completion_tokens,
                prompt_tokens: s.prompt_tokens,
            })
            .collect();
        timings.sort_by(|a, b| a.sent_ms.total_cmp(&b.sent_ms));
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
        let errors = self.errors.total() as u32;
        let narrow = |m: BTreeMap<String, u64>| -> BTreeMap<String, u32> {
            m.into_iter().map(|(k, v)| (k, v as u32)).collect()
        };
        let wall_s = wall.as_secs_f64();
        LevelReport {
            concurrency,
            requests,
            ok,
            errors,
            error_kinds: narrow(self.errors.kinds),
            error_details: narrow(self.errors.details),
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
            timings,
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
    /// Background requests that ended with their last token. A background request still
    /// streaming when the measurement ends is cancelled, not completed (see
    /// `cancelled_at_stop`): with requests longer than the measurement this stays 0.
    pub completed: u64,
    /// Background requests that failed (cancellation at the end is not counted here).
    pub errors: u64,
    /// Tokens of the completed requests.
    pub tokens: u64,
    pub wall_s: f64,
    /// `tokens` / `wall_s`: completed requests only (see `streamed_tok_s`).
    pub aggregate_tok_s: f64,
    /// `errors` per kind, as `LevelReport::error_kinds`.
    pub error_kinds: BTreeMap<String, u64>,
    /// `errors` per distinct kind and short message (`kind: message`), as
    /// `LevelReport::error_details`.
    pub error_details: BTreeMap<String, u64>,
    /// Of `errors`, those that happened before the measured levels began (while the streams
    /// were being started).
    pub errors_before_measurement: u64,
    /// Background requests still running when the measurement ended, cancelled by moe-bench
    /// (neither completed nor errors).
    pub cancelled_at_stop: u64,
    /// Tokens every background stream received, the cancelled and failed ones included.
    pub tokens_streamed: u64,
    /// `tokens_streamed` / `wall_s`: the background load's real generation rate.
    pub streamed_tok_s: f64,
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

/// One `#   N× detail` line per distinct error, most frequent first.
fn error_lines<N: Copy + Ord + std::fmt::Display>(
    out: &mut String,
    indent: &str,
    details: &BTreeMap<String, N>,
) {
    let mut v: Vec<_> = details.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    for (detail, n) in v {
        let _ = writeln!(out, "#{indent}{n}× {detail}");
    }
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
    for l in levels.iter().filter(|l| l.errors > 0) {
        let _ = writeln!(out, "# conc {}: {} errors:", l.concurrency, l.errors);
        error_lines(out, "   ", &l.error_details);
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
            let _ = writeln!(
                out,
                "# background: {} tokens streamed ({:.1} tok/s), {} requests cancelled at the end (not errors)",
                bg.tokens_streamed, bg.streamed_tok_s, bg.cancelled_at_stop
            );
            if bg.errors > 0 {
                let _ = writeln!(
                    out,
                    "# background errors: {} ({} before the measurement began):",
                    bg.errors, bg.errors_before_measurement
                );
                error_lines(&mut out, "   ", &bg.error_details);
            }
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
        let started = tokio::time::Instant::now();
        let mut acc = LevelAccumulator::default();
        // Recorded out of order: the timings come back in the order sent.
        for (ms, sent_ms) in [(200, 50), (100, 0)] {
            acc.record(Ok(Sample {
                sent: started + Duration::from_millis(sent_ms),
                ttft: Duration::from_millis(ms),
                decode: Duration::from_secs(1),
                completion_tokens: 11,
                prompt_tokens: Some(128),
            }));
        }
        acc.record(Err(BenchError::NoTokens));
        let l = acc.finish(2, 4, started, Duration::from_secs(2));
        assert_eq!((l.ok, l.errors, l.skipped), (2, 1, 1));
        assert_eq!(l.decode_tok_s_per_stream_mean, Some(10.0));
        assert_eq!(l.aggregate_tok_s, 11.0);
        assert_eq!(l.ttft_ms_p50, Some(100.0));
        let timing = |sent_ms, ttft_ms| RequestTiming {
            sent_ms,
            ttft_ms,
            decode_ms: 1000.0,
            completion_tokens: 11,
            prompt_tokens: Some(128),
        };
        assert_eq!(l.timings, [timing(0.0, 100.0), timing(50.0, 200.0)]);
        let json = serde_json::to_value(&l).expect("serializes");
        assert_eq!(json["timings"][1]["sent_ms"], 50.0);
        assert_eq!(json["timings"][0]["ttft_ms"], 100.0);
    }

    #[test]
    fn errors_are_counted_per_detail_up_to_a_bound() {
        let refused = |m: &str| BenchError::Status {
            code: tonic::Code::ResourceExhausted,
            message: m.into(),
        };
        let mut acc = LevelAccumulator::default();
        acc.record(Err(refused("busy")));
        let mut other = LevelAccumulator::default();
        other.record(Err(refused("busy")));
        other.record(Err(BenchError::NoTokens));
        acc.merge(other);
        let l = acc.finish(1, 3, tokio::time::Instant::now(), Duration::from_secs(1));
        assert_eq!(l.errors, 3);
        assert_eq!(l.error_kinds["grpc_resourceexhausted"], 2);
        assert_eq!(l.error_details["grpc_resourceexhausted: busy"], 2);
        assert_eq!(
            l.error_details["no_tokens: stream ended without generating a token"],
            1
        );
        let table = Report {
            label: String::new(),
            target: "grpc://127.0.0.1:1".into(),
            class: moe_common::LatencyClass::Interactive,
            prompt_tokens_requested: 8,
            max_tokens: 4,
            requests_per_level: 3,
            levels: vec![l],
            under_background: Vec::new(),
            background: None,
        }
        .table();
        assert!(
            table.contains("# conc 1: 3 errors:\n#   2× grpc_resourceexhausted: busy\n"),
            "{table}"
        );

        let mut tally = ErrorTally::default();
        for i in 0..MAX_ERROR_DETAILS + 5 {
            tally.record(&refused(&format!("busy {i}")));
        }
        tally.record(&refused("busy 0"));
        assert_eq!(tally.details.len(), MAX_ERROR_DETAILS + 1);
        assert_eq!(tally.details[OTHER_DETAILS], 5);
        assert_eq!(tally.details["grpc_resourceexhausted: busy 0"], 2);
        assert_eq!(tally.total(), MAX_ERROR_DETAILS as u64 + 6);
    }
}
