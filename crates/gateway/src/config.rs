//! Command-line and environment configuration of `moe-gateway`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use moe_common::flags::parse_duration_flag;
use moe_common::registry::EtcdArgs;

use crate::scheduler::Spill;

/// Stateless gateway: watches the etcd registry and routes streaming completions to workers by
/// latency class and memory headroom.
#[derive(Clone, Debug, Parser)]
#[command(name = "moe-gateway", version, about)]
pub struct GatewayConfig {
    /// Address the gRPC server listens on.
    #[arg(long, env = "MOE_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Address the OpenAI-compatible HTTP API listens on (off when unset).
    #[arg(long, env = "MOE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// etcd endpoints (required), prefix, credentials and TLS.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Address of the Prometheus /metrics endpoint (off when unset).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Streams proxied at once; more get RESOURCE_EXHAUSTED at once (load shedding).
    #[arg(long, env = "MOE_MAX_CONCURRENCY", default_value_t = 1024)]
    pub max_concurrency: usize,
    /// Of the --max-concurrency streams, how many only INTERACTIVE requests may take, so BATCH
    /// work cannot fill the gateway (default: an eighth, at least 1; at most --max-concurrency
    /// less 1).
    #[arg(long, env = "MOE_INTERACTIVE_RESERVED_STREAMS")]
    pub interactive_reserved_streams: Option<usize>,
    /// Longest a request may take (also caps client deadlines).
    #[arg(long, env = "MOE_REQUEST_TIMEOUT", default_value = "600s", value_parser = parse_duration_flag)]
    pub request_timeout: Duration,
    /// On SIGTERM, how long running streams may take to finish before they are cut.
    #[arg(long, env = "MOE_DRAIN_GRACE", default_value = "30s", value_parser = parse_duration_flag)]
    pub drain_grace: Duration,
    /// Longest a stream may wait for its worker's next message before the worker counts as
    /// failed (the stream is retried or migrated), or for its client to read before it is cut.
    #[arg(long, env = "MOE_STREAM_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration_flag)]
    pub stream_idle_timeout: Duration,
    /// Longest a worker may take to send its first message of a stream (it may be queueing for
    /// KV room or prefilling a long prompt) before it counts as failed.
    #[arg(long, env = "MOE_FIRST_MESSAGE_TIMEOUT", default_value = "120s", value_parser = parse_duration_flag)]
    pub first_message_timeout: Duration,
    /// Consecutive failed attempts after which a worker is left out of placement for a while
    /// (doubling on each ejection, up to a minute); 0 turns ejection off.
    #[arg(long, env = "MOE_OUTLIER_FAILURES", default_value_t = 3)]
    pub outlier_failures: u32,
    /// How long a worker is first ejected for (see --outlier-failures).
    #[arg(long, env = "MOE_OUTLIER_EJECTION", default_value = "5s", value_parser = parse_duration_flag)]
    pub outlier_ejection: Duration,
    /// gRPC requests read and decoded at once (health and reflection not counted); more are
    /// refused with RESOURCE_EXHAUSTED. Bounds request memory to about this many times
    /// --max-message-bytes (times the decoding expansion). A request gives its place back once
    /// decoded, before its prompt is sized and it is placed.
    #[arg(long, env = "MOE_MAX_DECODING_REQUESTS", default_value_t = 64)]
    pub max_decoding_requests: usize,
    /// Of the --max-decoding-requests places, how many only INTERACTIVE requests may keep, so a
    /// burst of BATCH requests cannot make INTERACTIVE ones be refused at once (default: an
    /// eighth, at least 1; at most --max-decoding-requests less 1). On the HTTP API, the same
    /// share of the request-body byte budget.
    #[arg(long, env = "MOE_INTERACTIVE_RESERVED_DECODING")]
    pub interactive_reserved_decoding: Option<usize>,
    /// Longest a gRPC request may take to arrive (its body read and decoded); a slower upload
    /// is refused with DEADLINE_EXCEEDED and frees its place under --max-decoding-requests.
    #[arg(long, env = "MOE_REQUEST_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration_flag)]
    pub request_read_timeout: Duration,
    /// HTTP/2 streams one client connection may have open at once on the gRPC port.
    #[arg(long, env = "MOE_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// Interval of HTTP/2 keepalive pings to idle gRPC clients (a half-open connection is
    /// closed after one more --keepalive-timeout).
    #[arg(long, env = "MOE_KEEPALIVE_INTERVAL", default_value = "20s", value_parser = parse_duration_flag)]
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, env = "MOE_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration_flag)]
    pub keepalive_timeout: Duration,
    /// Workers tried per request at most (placement, retries, migrations).
    #[arg(long, env = "MOE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// May INTERACTIVE requests use offloaded workers: on, off or below:LOAD.
    #[arg(long, env = "MOE_INTERACTIVE_SPILL", default_value = "on")]
    pub interactive_spill: Spill,
    /// May BATCH requests use full-GPU workers: on, off or below:LOAD.
    #[arg(long, env = "MOE_BATCH_SPILL", default_value = "below:0.5")]
    pub batch_spill: Spill,
    /// Prefix-aware routing: follow every worker's prefix cache (WatchPrefixCache) and prefer
    /// workers that hold the start of a prompt (see docs/api.md, "Prefix-aware routing").
    #[arg(long, env = "MOE_PREFIX_ROUTING", value_enum, default_value = "on")]
    pub prefix_routing: OnOff,
    /// Longest wait for a worker to tokenize a request before placement (its real token count
    /// and block hashes); on timeout or failure the bytes/3 estimate is used. 0 turns it off.
    #[arg(long, env = "MOE_TOKENIZE_TIMEOUT", default_value = "250ms", value_parser = parse_duration_flag)]
    pub tokenize_timeout: Duration,
    /// Limits on what clients send (--max-tokens-limit, --max-prompt-bytes, ...).
    #[command(flatten)]
    pub limits: moe_common::request::RequestLimits,
    /// TLS on the gateway's ports, TLS to workers, API keys.
    #[command(flatten)]
    pub security: crate::security::SecurityArgs,
    #[command(flatten)]
    pub telemetry: moe_common::telemetry::TelemetryConfig,
}

/// A switch flag's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.telemetry.validate()?;
        if self.max_concurrency == 0 {
            return Err("--max-concurrency must be at least 1".into());
        }
        if let Some(r) = self.interactive_reserved_streams
            && r >= self.max_concurrency
            && r > 0
        {
            return Err(format!(
                "--interactive-reserved-streams ({r}) must be less than --max-concurrency ({})",
                self.max_concurrency
            ));
        }
        if self.first_message_timeout.is_zero() {
            return Err("--first-message-timeout must be more than 0".into());
        }
        if self.stream_idle_timeout.is_zero() {
            return Err("--stream-idle-timeout must be more than 0".into());
        }
        if self.request_read_timeout.is_zero() {
            return Err("--request-read-timeout must be more than 0".into());
        }
        if self.max_decoding_requests == 0 {
            return Err("--max-decoding-requests must be at least 1".into());
        }
        if let Some(r) = self.interactive_reserved_decoding
            && r >= self.max_decoding_requests
            && r > 0
        {
            return Err(format!(
                "--interactive-reserved-decoding ({r}) must be less than --max-decoding-requests ({})",
                self.max_decoding_requests
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("--max-attempts must be at least 1".into());
        }
        self.etcd.require()?;
        self.limits.validate()?;
        self.security.validate()?;
        Ok(())
    }

    /// The INTERACTIVE-only share of --max-concurrency (flag, or the default).
    pub fn interactive_reserved_streams(&self) -> usize {
        self.interactive_reserved_streams
            .unwrap_or_else(|| crate::admission::default_interactive_reserve(self.max_concurrency))
    }

    /// The INTERACTIVE-only share of --max-decoding-requests (flag, or the default).
    pub fn interactive_reserved_decoding(&self) -> usize {
        self.interactive_reserved_decoding.unwrap_or_else(|| {
            crate::admission::default_interactive_reserve(self.max_decoding_requests)
        })
    }

    /// Defaults with the given etcd endpoints (tests, embedding).
    pub fn for_etcd(endpoints: &[String]) -> Self {
        GatewayConfig::parse_from(["moe-gateway", "--etcd", &endpoints.join(",")])
    }
}
