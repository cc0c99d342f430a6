//! Command-line configuration of `moe-bench`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use moe_common::LatencyClass;
use moe_common::flags::parse_bounded_duration_flag;

use crate::target::Target;

/// Drives streaming generation load against a moe-cluster worker or gateway (gRPC) or an
/// upstream llama-server (HTTP), level by level, and reports TTFT and token rates.
#[derive(Clone, Debug, Parser)]
#[command(name = "moe-bench", version, about)]
pub struct BenchConfig {
    /// grpc://HOST:PORT (worker or gateway) or llama-server://HOST:PORT; loopback hosts only.
    #[arg(long, env = "MOE_BENCH_TARGET")]
    pub target: Target,
    /// Concurrent streams of each level, comma-separated.
    #[arg(
        long,
        env = "MOE_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,4,8,16"
    )]
    pub concurrency: Vec<u32>,
    /// Requests per level (at least the level's concurrency is sent).
    #[arg(long, env = "MOE_BENCH_REQUESTS_PER_LEVEL", default_value_t = 8)]
    pub requests_per_level: u32,
    /// Approximate prompt length in tokens (one common word is about one token).
    #[arg(long, env = "MOE_BENCH_PROMPT_TOKENS", default_value_t = 128)]
    pub prompt_tokens: u32,
    /// Tokens to generate per request.
    #[arg(long, env = "MOE_BENCH_MAX_TOKENS", default_value_t = 64)]
    pub max_tokens: u32,
    /// Latency class of the measured requests (gRPC only).
    #[arg(long, env = "MOE_BENCH_CLASS", value_enum, default_value_t = LatencyClass::Interactive)]
    pub class: LatencyClass,
    /// Unmeasured requests sent one at a time before the first level.
    #[arg(long, env = "MOE_BENCH_WARMUP", default_value_t = 1)]
    pub warmup: u32,
    /// Retry the first warm-up request for this long (servers loading a model, gateways that
    /// have not seen a worker yet).
    #[arg(long, env = "MOE_BENCH_WAIT_READY", default_value = "60s", value_parser = parse_bounded_duration_flag)]
    pub wait_ready: Duration,
    /// Keep this many BATCH streams running (gRPC only) and measure every level twice: idle,
    /// then under that background load.
    #[arg(long, env = "MOE_BENCH_BACKGROUND_BATCH", default_value_t = 0)]
    pub background_batch: u32,
    /// Tokens each background BATCH request generates.
    #[arg(long, env = "MOE_BENCH_BACKGROUND_MAX_TOKENS", default_value_t = 256)]
    pub background_max_tokens: u32,
    /// Longest a single request may take.
    #[arg(long, env = "MOE_BENCH_REQUEST_TIMEOUT", default_value = "120s", value_parser = parse_bounded_duration_flag)]
    pub request_timeout: Duration,
    /// Longest a level may take; requests not started by then are skipped and counted.
    #[arg(long, env = "MOE_BENCH_LEVEL_TIMEOUT", default_value = "300s", value_parser = parse_bounded_duration_flag)]
    pub level_timeout: Duration,
    /// Writes the full report as JSON here: per level the summary and every completed
    /// request's timings (`timings`: sent after the level began, TTFT, decode time, tokens).
    #[arg(long, env = "MOE_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Free-form label stored in the report (e.g. "worker", "llama-server", "gateway").
    #[arg(long, env = "MOE_BENCH_LABEL", default_value = "")]
    pub label: String,
    /// Run the multi-turn chat workload instead of the levels: this many conversations at once
    /// (gRPC only; see `chat.rs`). 0: off.
    #[arg(long, env = "MOE_BENCH_CHAT_CONVERSATIONS", default_value_t = 0)]
    pub chat_conversations: u32,
    /// Turns per conversation of the chat workload.
    #[arg(long, env = "MOE_BENCH_CHAT_TURNS", default_value_t = 4)]
    pub chat_turns: u32,
    /// Approximate tokens of the system prompt every conversation shares.
    #[arg(long, env = "MOE_BENCH_CHAT_SYSTEM_TOKENS", default_value_t = 64)]
    pub chat_system_tokens: u32,
    /// Longest pause before each later turn of the chat workload, in milliseconds (a user
    /// reading the answer): each pause is drawn uniformly from 0..=this, the same for every run
    /// and label (a hash of conversation and turn). 0: the next turn follows at once.
    #[arg(long, env = "MOE_BENCH_CHAT_THINK_MS", default_value_t = 0)]
    pub chat_think_ms: u64,
    /// Seed of the chat workload's first messages: runs given the same seed send the same
    /// conversations (e.g. the two modes of an A/B comparison). Default: from `--label`, so two
    /// runs against the same workers do not share documents.
    #[arg(long, env = "MOE_BENCH_CHAT_SEED")]
    pub chat_seed: Option<u64>,
}

/// Upper bounds that keep every run finite.
pub const MAX_REQUESTS_PER_LEVEL: u32 = 10_000;
pub const MAX_CONCURRENCY: u32 = 1024;

impl BenchConfig {
    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency.is_empty()
            || self
                .concurrency
                .iter()
                .any(|&c| c == 0 || c > MAX_CONCURRENCY)
        {
            return Err(format!(
                "--concurrency values must be 1..={MAX_CONCURRENCY}"
            ));
        }
        if self.requests_per_level == 0 || self.requests_per_level > MAX_REQUESTS_PER_LEVEL {
            return Err(format!(
                "--requests-per-level must be 1..={MAX_REQUESTS_PER_LEVEL}"
            ));
        }
        if self.max_tokens == 0 || self.prompt_tokens == 0 {
            return Err("--max-tokens and --prompt-tokens must be at least 1".into());
        }
        if self.background_batch > 0 && !matches!(self.target, Target::Grpc { .. }) {
            return Err("--background-batch needs a grpc:// target".into());
        }
        if self.chat_conversations > 0 {
            if !matches!(self.target, Target::Grpc { .. }) {
                return Err("--chat-conversations needs a grpc:// target".into());
            }
            if self.chat_conversations > MAX_CONCURRENCY || self.chat_turns == 0 {
                return Err(format!(
                    "--chat-conversations must be at most {MAX_CONCURRENCY} and --chat-turns at least 1"
                ));
            }
        }
        if self.background_batch > MAX_CONCURRENCY {
            return Err(format!(
                "--background-batch must be at most {MAX_CONCURRENCY}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_batch_needs_grpc() {
        let c = BenchConfig::parse_from([
            "moe-bench",
            "--target",
            "llama-server://127.0.0.1:8080",
            "--background-batch",
            "4",
        ]);
        assert!(c.validate().is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(
            parse_bounded_duration_flag("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(
            parse_bounded_duration_flag("2m").unwrap(),
            Duration::from_secs(120)
        );
        assert_eq!(
            parse_bounded_duration_flag("30").unwrap(),
            Duration::from_secs(30)
        );
        assert!(parse_bounded_duration_flag("-1s").is_err());
    }
}
