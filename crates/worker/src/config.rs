//! Command-line and environment configuration of `moe-worker`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use moe_common::flags::parse_duration_flag;
use moe_common::offload::OffloadProfile;
use moe_common::plan::KvCacheType;
use moe_common::size::ByteSize;

use crate::engine::DecodeMode;

/// Serves one GGUF MoE model through llama.cpp and advertises itself in etcd.
#[derive(Clone, Debug, Parser)]
#[command(name = "moe-worker", version, about)]
pub struct WorkerConfig {
    /// GGUF model file.
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Name clients use to ask for this model (default: the model file's stem).
    #[arg(long, env = "MOE_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Where routed experts live: full, cpu-moe, n-cpu-moe:N or auto (with --vram-budget).
    #[arg(long, env = "MOE_OFFLOAD", default_value = "full")]
    pub offload: OffloadProfile,
    /// Accelerator memory the auto profile may use, e.g. 8GiB.
    #[arg(long, env = "MOE_VRAM_BUDGET")]
    pub vram_budget: Option<ByteSize>,
    /// Address the gRPC server listens on.
    #[arg(long, env = "MOE_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,
    /// host:port gateways dial (default: the listen address, 127.0.0.1 for 0.0.0.0).
    #[arg(long, env = "MOE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// etcd endpoints (none runs the worker unregistered), prefix, credentials and TLS.
    #[command(flatten)]
    pub etcd: moe_common::registry::EtcdArgs,
    /// Worker id, unique in the cluster (default: hostname-port).
    #[arg(long = "id", env = "MOE_WORKER_ID")]
    pub id: Option<String>,
    /// KV cache cells of the running sequences, all together (each of the --parallel sequences
    /// gets --ctx-size/--parallel unless --kv-unified).
    #[arg(long, env = "MOE_CTX_SIZE", default_value_t = 4096)]
    pub ctx_size: u32,
    /// Sequences decoded together (continuous batching slots).
    #[arg(long, env = "MOE_PARALLEL", default_value_t = 4)]
    pub parallel: u32,
    /// KV streams beyond --parallel that only hold idle cached sequences (prefix cache), so
    /// this many more conversations keep their history between turns. Each takes a running
    /// sequence's share of cells: KV memory grows by --ctx-size/--parallel cells per stream.
    /// Default 0: KV memory as without it (at or below llama-server's for the same --ctx-size).
    /// Needs per-sequence streams (not with --kv-unified).
    #[arg(long, env = "MOE_CACHE_SEQUENCES", default_value_t = 0)]
    pub cache_sequences: u32,
    /// Layers on the accelerator (default: all).
    #[arg(long, env = "MOE_GPU_LAYERS")]
    pub gpu_layers: Option<u32>,
    /// CPU threads for llama.cpp (default: all cores).
    #[arg(long, env = "MOE_THREADS")]
    pub threads: Option<u32>,
    /// Tokens per engine step: decodes plus prompt chunks.
    #[arg(long, env = "MOE_BATCH_SIZE", default_value_t = 512)]
    pub batch_size: u32,
    /// Tokens per llama.cpp micro-batch (`n_ubatch`; default min(--batch-size, 512)). Compute
    /// buffers scale with it, and so do sliding-window layers' KV (per stream: window +
    /// micro-batch, padded to 256 cells); smaller saves accelerator memory, prefill may be
    /// slower. At most --batch-size.
    #[arg(long, env = "MOE_UBATCH_SIZE")]
    pub ubatch_size: Option<u32>,
    /// One KV cache shared by all sequences (llama.cpp `kv_unified`). Off by default: each
    /// sequence then has its own --ctx-size/--parallel cells, and greedy output does not depend
    /// on which other sequences share the batch (issue 14). On lets one request use the whole
    /// cache, but concurrent sequences' cells interleave and change rounding.
    #[arg(long, env = "MOE_KV_UNIFIED")]
    pub kv_unified: bool,
    /// Element type of the K cache, as llama-server's --cache-type-k: f16 (default), f32, bf16,
    /// q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1. q8_0 takes 34/64 of f16's memory. Not f16 changes
    /// the numbers the model computes: the worker then advertises another model fingerprint,
    /// so streams never move between it and f16 workers.
    #[arg(long, env = "MOE_CACHE_TYPE_K", default_value_t = KvCacheType::F16)]
    pub cache_type_k: KvCacheType,
    /// Element type of the V cache (as --cache-type-k); a quantized V cache needs llama.cpp's
    /// flash attention, which the worker leaves on auto.
    #[arg(long, env = "MOE_CACHE_TYPE_V", default_value_t = KvCacheType::F16)]
    pub cache_type_v: KvCacheType,
    /// Decode each sequence in its own llama.cpp call instead of one batch per step. GPU kernels
    /// choose their algorithm by batch shape (measured on an H200: with batched steps no greedy
    /// text equalled its solo run), so with this on a sequence sees the same kernel shapes as
    /// when it runs alone; the cost is decode batching (docs/benchmarks/batch-invariance.md).
    /// The CPU needs it too: ggml-cpu multiplies one row and several rows with different
    /// kernels (docs/benchmarks/batch-invariance.md).
    /// Same as --decode-mode sequential (kept for existing deployments).
    #[arg(long, env = "MOE_SEQUENTIAL_DECODE")]
    pub sequential_decode: bool,
    /// auto: on a worker with an accelerator (even at --gpu-layers 0) grouped wherever that is
    /// batch-invariant (below: with routed experts in host memory too, faster there than
    /// sequential on an H200, docs/benchmarks/gpu.md ninth run), else sequential (e.g. host
    /// experts on an AVX-512 build); batched on the CPU.
    /// sequential: one llama.cpp call per sequence and prompts prefilled in --batch-size chunks
    /// at fixed boundaries, so greedy output is exactly a solo run's, prefix cache or not.
    /// batched: one call per step for all sequences (faster on a GPU, not batch-invariant
    /// there).
    /// grouped: prompts prefilled as in sequential, the decoding sequences' tokens together in
    /// calls of up to --grouped-rows sequences, with kernels that compute each row as alone:
    /// batch-invariant; on a GPU it needs patch 0001 (patches/llama.cpp) and, with routed
    /// experts in host memory, 0001 version 2 and the CPU patch 0002 in a ggml-cpu built for x86
    /// AVX2 without AVX-512, and refuses to start otherwise, naming what is missing.
    /// See docs/benchmarks/batch-invariance.md.
    #[arg(long, env = "MOE_DECODE_MODE", value_enum, default_value_t = DecodeMode::Auto)]
    pub decode_mode: DecodeMode,
    /// grouped: a step's decodes run in consecutive llama.cpp calls of at most this many
    /// sequences, and the step is cut short between them when an INTERACTIVE request arrives,
    /// so such a request waits for at most one call (a call's time grows about linearly with
    /// its rows beyond a few: ~150 ms for 60 rows of a 20B model on an H200). Output does not
    /// change with it: each row is computed as it would be alone. A larger value makes fewer
    /// calls per step (a little more throughput); a smaller one a shorter wait.
    #[arg(long, env = "MOE_GROUPED_ROWS", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub grouped_rows: u32,
    /// Requests waiting for KV headroom at most; more get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "MOE_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// How long a request may wait for KV headroom before RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOE_QUEUE_TIMEOUT", default_value = "30s", value_parser = parse_duration_flag)]
    pub queue_timeout: Duration,
    /// On SIGTERM, how long running streams may take to finish before they are cancelled.
    #[arg(long, env = "MOE_DRAIN_GRACE", default_value = "30s", value_parser = parse_duration_flag)]
    pub drain_grace: Duration,
    /// An engine that holds work but makes no progress for this long is wedged: the worker goes
    /// NOT_SERVING, leaves etcd and exits non-zero (0s: only a dead engine thread does that).
    #[arg(long, env = "MOE_ENGINE_STALL_TIMEOUT", default_value = "60s", value_parser = parse_duration_flag)]
    pub engine_stall_timeout: Duration,
    /// etcd lease TTL: a dead worker disappears after this long.
    #[arg(long, env = "MOE_LEASE_TTL", default_value = "10s", value_parser = parse_duration_flag)]
    pub lease_ttl: Duration,
    /// Address of the Prometheus /metrics endpoint (off when unset).
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub telemetry: moe_common::telemetry::TelemetryConfig,
    /// TLS on the gRPC port (the advert then says https://); mTLS with --tls-client-ca.
    #[command(flatten)]
    pub tls: moe_common::tls::ServerTlsArgs,
    /// Limits on requests; keep them at least the gateways' (requests are checked again here).
    #[command(flatten)]
    pub limits: moe_common::request::RequestLimits,
}

impl WorkerConfig {
    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        self.telemetry.validate()?;
        self.limits.validate()?;
        if self.parallel == 0 || self.parallel > 256 {
            return Err("--parallel must be 1..=256".into());
        }
        if self.parallel + self.cache_sequences.min(256) > 256 {
            return Err("--parallel plus --cache-sequences must be at most 256".into());
        }
        if self.cache_sequences > 0 && self.kv_unified {
            return Err(
                "--cache-sequences needs per-sequence KV streams (not --kv-unified)".into(),
            );
        }
        if self.sequential_decode
            && matches!(self.decode_mode, DecodeMode::Batched | DecodeMode::Grouped)
        {
            return Err(format!(
                "--sequential-decode contradicts --decode-mode {}",
                self.decode_mode.as_str()
            ));
        }
        if self.ctx_size < 64 {
            return Err("--ctx-size must be at least 64".into());
        }
        if self.batch_size < self.parallel {
            return Err("--batch-size must be at least --parallel".into());
        }
        if let Some(u) = self.ubatch_size
            && (u == 0 || u > self.batch_size)
        {
            return Err("--ubatch-size must be 1..=--batch-size".into());
        }
        if self.offload == OffloadProfile::Auto && self.vram_budget.is_none() {
            return Err("--offload auto needs --vram-budget".into());
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err("--lease-ttl must be at least 2s".into());
        }
        self.etcd.validate()?;
        Ok(())
    }

    /// Tokens per llama.cpp micro-batch: `--ubatch-size`, else min(--batch-size, 512).
    pub fn ubatch_size(&self) -> u32 {
        self.ubatch_size
            .unwrap_or(self.batch_size.min(moe_common::plan::UBATCH_TOKENS as u32))
    }

    /// The decode mode asked for: `--sequential-decode` is `--decode-mode sequential`.
    pub fn decode_mode(&self) -> DecodeMode {
        if self.sequential_decode {
            DecodeMode::Sequential
        } else {
            self.decode_mode
        }
    }

    /// The id this worker registers under.
    pub fn worker_id(&self, port: u16) -> String {
        self.id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .unwrap_or_else(|| "worker".into());
            format!("{host}-{port}")
        })
    }

    /// A config with defaults for everything but the model (tests, embedding).
    pub fn for_model(model: impl Into<PathBuf>) -> Self {
        WorkerConfig::parse_from(["moe-worker", "--model", &model.into().to_string_lossy()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> WorkerConfig {
        let mut all = vec!["moe-worker", "--model", "m.gguf"];
        all.extend_from_slice(args);
        WorkerConfig::try_parse_from(all).expect("parses")
    }

    #[test]
    fn the_micro_batch_defaults_to_the_batch_up_to_512() {
        assert_eq!(parse(&[]).ubatch_size(), 512);
        assert_eq!(parse(&["--batch-size", "2048"]).ubatch_size(), 512);
        assert_eq!(parse(&["--batch-size", "256"]).ubatch_size(), 256);
        let c = parse(&["--batch-size", "2048", "--ubatch-size", "128"]);
        assert_eq!(c.ubatch_size(), 128);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn the_micro_batch_is_one_to_the_batch() {
        let c = parse(&["--batch-size", "256", "--ubatch-size", "512"]);
        assert!(c.validate().unwrap_err().contains("--ubatch-size"));
        let c = parse(&["--ubatch-size", "0"]);
        assert!(c.validate().unwrap_err().contains("--ubatch-size"));
        assert_eq!(parse(&["--ubatch-size", "512"]).validate(), Ok(()));
    }

    #[test]
    fn kv_cache_types_take_llama_servers_names() {
        let c = parse(&[]);
        assert_eq!(
            (c.cache_type_k, c.cache_type_v),
            (KvCacheType::F16, KvCacheType::F16)
        );
        let c = parse(&["--cache-type-k", "q8_0", "--cache-type-v", "q4_0"]);
        assert_eq!(
            (c.cache_type_k, c.cache_type_v),
            (KvCacheType::Q8_0, KvCacheType::Q4_0)
        );
        let all = ["moe-worker", "--model", "m.gguf", "--cache-type-k", "q3_k"];
        let e = WorkerConfig::try_parse_from(all).unwrap_err().to_string();
        assert!(e.contains("q3_k") && e.contains("q8_0"), "{e}");
    }

    #[test]
    fn grouped_rows_defaults_to_16_and_must_be_at_least_one() {
        assert_eq!(parse(&[]).grouped_rows, 16);
        assert_eq!(parse(&["--grouped-rows", "4"]).grouped_rows, 4);
        let all = ["moe-worker", "--model", "m.gguf", "--grouped-rows", "0"];
        assert!(WorkerConfig::try_parse_from(all).is_err());
    }

    #[test]
    fn decode_modes_parse_and_the_old_flag_means_sequential_only() {
        for (arg, mode) in [
            ("auto", DecodeMode::Auto),
            ("sequential", DecodeMode::Sequential),
            ("batched", DecodeMode::Batched),
            ("grouped", DecodeMode::Grouped),
        ] {
            let c = parse(&["--decode-mode", arg]);
            assert_eq!((c.decode_mode(), mode.as_str()), (mode, arg));
            assert_eq!(c.validate(), Ok(()));
        }
        assert_eq!(
            parse(&["--sequential-decode"]).decode_mode(),
            DecodeMode::Sequential
        );
        for arg in ["batched", "grouped"] {
            let e = parse(&["--sequential-decode", "--decode-mode", arg]).validate();
            assert_eq!(
                e,
                Err(format!(
                    "--sequential-decode contradicts --decode-mode {arg}"
                ))
            );
        }
    }
}
