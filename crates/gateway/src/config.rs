//! Command-line and environment configuration of `moe-gateway`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use moe_common::registry::EtcdArgs;
use moe_common::flags::parse_duration_flag;

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
    /// Longest a request may take (also caps client deadlines).
    #[arg(long, env = "MOE_REQUEST_TIMEOUT", default_value = "600s", value_parser = parse_duration_flag)]
    pub request_timeout: Duration,
    /// On SIGTERM, how long running streams may take to finish before they are cut.
    #[arg(long, env = "MOE_DRAIN_GRACE", default_value = "30s", value_parser = parse_duration_flag)]
    pub drain_grace: Duration,
    /// Workers tried per request at most (placement, retries, migrations).
    #[arg(long, env = "MOE_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// May INTERACTIVE requests use offloaded workers: on, off or below:LOAD.
    #[arg(long, env = "MOE_INTERACTIVE_SPILL", default_value = "on")]
    pub interactive_spill: Spill,
    /// May BATCH requests use full-GPU workers: on, off or below:LOAD.
    #[arg(long, env = "MOE_BATCH_SPILL", default_value = "below:0.5")]
    pub batch_spill: Spill,
    /// Limits on what clients send (--max-tokens-limit, --max-prompt-bytes, ...).
    #[command(flatten)]
    pub limits: moe_common::request::RequestLimits,
    /// TLS on the gateway's ports, TLS to workers, API keys.
    #[command(flatten)]
    pub security: crate::security::SecurityArgs,
    #[command(flatten)]
    pub telemetry: moe_common::telemetry::TelemetryConfig,
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.telemetry.validate()?;
        if self.max_concurrency == 0 {
            return Err("--max-concurrency must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("--max-attempts must be at least 1".into());
        }
        self.etcd.require()?;
        self.limits.validate()?;
        self.security.validate()?;
        Ok(())
    }

    /// Defaults with the given etcd endpoints (tests, embedding).
    pub fn for_etcd(endpoints: &[String]) -> Self {
        GatewayConfig::parse_from(["moe-gateway", "--etcd", &endpoints.join(",")])
    }
}
