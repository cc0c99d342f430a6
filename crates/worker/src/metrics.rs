//! The worker's Prometheus metrics (names and labels as catalogued in docs/metrics.md). Every
//! series carries `worker`, `model` and `profile`. Request metrics are recorded by the service;
//! load, KV, memory and registration gauges follow the engine stats, the advert and the
//! registrar in [`follow`].

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use moe_common::registry::{RegistrationStatus, WorkerAdvert, WorkerState};
use moe_common::telemetry::metrics::{code_label, latency_buckets, token_latency_buckets};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{Class, EngineStats};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

pub fn class_label(class: Class) -> &'static str {
    match class {
        Class::Interactive => "interactive",
        Class::Batch => "batch",
    }
}

#[derive(Default)]
struct Devices {
    total: Family<DeviceLabels, Gauge>,
    free: Family<DeviceLabels, Gauge>,
    used: Family<DeviceLabels, Gauge>,
    weights: Family<DeviceLabels, Gauge>,
    kv: Family<DeviceLabels, Gauge>,
    compute: Family<DeviceLabels, Gauge>,
    process: Family<DeviceLabels, Gauge>,
    overhead: Family<DeviceLabels, Gauge>,
}

/// The load signals under the names vLLM exports and the Gateway API Inference Extension and
/// autoscalers read; same sources as `moe_worker_queue_depth`, `moe_worker_active_sequences`
/// and `moe_worker_kv_utilization`.
#[derive(Default)]
struct VllmCompat {
    waiting: Gauge,
    running: Gauge,
    kv_usage: FloatGauge,
}

pub struct WorkerMetrics {
    requests: Family<OutcomeLabels, Counter>,
    ttft: HistogramFamily<ClassLabels>,
    queue_wait: HistogramFamily<ClassLabels>,
    inter_token: HistogramFamily<ClassLabels>,
    prompt_tokens: Counter,
    generated_tokens: Family<ClassLabels, Counter>,
    abandoned: Counter,
    llama_calls: Counter,
    stream_moves: Counter,
    queue_depth: Gauge,
    active: Gauge,
    max_sequences: Gauge,
    kv_capacity: Gauge,
    kv_free: Gauge,
    kv_used: Gauge,
    kv_utilization: FloatGauge,
    decode_tps: FloatGauge,
    prefill_tps: FloatGauge,
    devices: Devices,
    host_expert_bytes: Gauge,
    state: Family<StateLabels, Gauge>,
    registered: Gauge,
    registrations: Counter,
    vllm: VllmCompat,
}

impl WorkerMetrics {
    /// Metrics that count but are exported nowhere (services built without a registry).
    pub fn unregistered() -> Self {
        WorkerMetrics {
            requests: Family::default(),
            ttft: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            queue_wait: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            inter_token: Family::new_with_constructor(|| Histogram::new(token_latency_buckets())),
            prompt_tokens: Counter::default(),
            generated_tokens: Family::default(),
            abandoned: Counter::default(),
            llama_calls: Counter::default(),
            stream_moves: Counter::default(),
            queue_depth: Gauge::default(),
            active: Gauge::default(),
            max_sequences: Gauge::default(),
            kv_capacity: Gauge::default(),
            kv_free: Gauge::default(),
            kv_used: Gauge::default(),
            kv_utilization: FloatGauge::default(),
            decode_tps: FloatGauge::default(),
            prefill_tps: FloatGauge::default(),
            devices: Devices::default(),
            host_expert_bytes: Gauge::default(),
            state: Family::default(),
            registered: Gauge::default(),
            registrations: Counter::default(),
            vllm: VllmCompat::default(),
        }
    }

    /// Registers every worker metric in `registry`, labelled with this worker's id, model and
    /// offload profile.
    pub fn register(
        registry: &mut Registry,
        worker: &str,
        model: &str,
        profile: &str,
    ) -> Arc<Self> {
        let m = Self::unregistered();
        let labels: [(Cow<'static, str>, Cow<'static, str>); 3] = [
            ("worker".into(), worker.to_string().into()),
            ("model".into(), model.to_string().into()),
            ("profile".into(), profile.to_string().into()),
        ];
        let r = registry.sub_registry_with_labels(labels.into_iter());
        r.register(
            "moe_worker_requests",
            "Requests finished on this worker, by outcome (ok, cancelled, or the gRPC status)",
            m.requests.clone(),
        );
        r.register(
            "moe_worker_time_to_first_token_seconds",
            "From a request's arrival at the worker to its first generated token",
            m.ttft.clone(),
        );
        r.register(
            "moe_worker_queue_wait_seconds",
            "From a request's arrival to its admission into the batch",
            m.queue_wait.clone(),
        );
        r.register(
            "moe_worker_inter_token_latency_seconds",
            "Time between tokens streamed by this worker (one observation per token)",
            m.inter_token.clone(),
        );
        r.register(
            "moe_worker_prompt_tokens",
            "Prompt tokens of finished requests (including resumed tokens)",
            m.prompt_tokens.clone(),
        );
        r.register(
            "moe_worker_generated_tokens",
            "Tokens generated and streamed by this worker",
            m.generated_tokens.clone(),
        );
        r.register(
            "moe_worker_abandoned_sequences",
            "Sequences the engine stopped because their client went away",
            m.abandoned.clone(),
        );
        r.register(
            "moe_worker_llama_decode_calls",
            "llama.cpp decode calls of engine steps (batched: one per step; sequential: one per \
             sequence; grouped: one per prompt chunk plus one for all of a step's decodes)",
            m.llama_calls.clone(),
        );
        r.register(
            "moe_worker_stream_moves",
            "KV streams moved to keep the running sequences' streams consecutive (llama.cpp \
             computes a call's scattered streams as one graph per run of consecutive ones)",
            m.stream_moves.clone(),
        );
        r.register(
            "moe_worker_queue_depth",
            "Requests waiting for admission",
            m.queue_depth.clone(),
        );
        r.register(
            "moe_worker_active_sequences",
            "Sequences admitted into the batch",
            m.active.clone(),
        );
        r.register(
            "moe_worker_max_sequences",
            "Sequences decoded together at most (--parallel)",
            m.max_sequences.clone(),
        );
        r.register(
            "moe_worker_kv_capacity_tokens",
            "KV cache size in tokens (cells)",
            m.kv_capacity.clone(),
        );
        r.register(
            "moe_worker_kv_free_tokens",
            "KV cache tokens neither reserved by admitted requests nor claimed by queued ones",
            m.kv_free.clone(),
        );
        r.register(
            "moe_worker_kv_used_tokens",
            "KV cache tokens reserved by admitted requests or claimed by queued ones",
            m.kv_used.clone(),
        );
        r.register(
            "moe_worker_kv_utilization",
            "Reserved or claimed share of the KV cache, 0 to 1",
            m.kv_utilization.clone(),
        );
        r.register(
            "moe_worker_decode_tokens_per_second",
            "Decode speed of one sequence (recent average)",
            m.decode_tps.clone(),
        );
        r.register(
            "moe_worker_prefill_tokens_per_second",
            "Prompt tokens processed per second (recent average)",
            m.prefill_tps.clone(),
        );
        r.register(
            "moe_worker_device_memory_total_bytes",
            "Memory of each device llama.cpp uses",
            m.devices.total.clone(),
        );
        r.register(
            "moe_worker_device_memory_free_bytes",
            "Free memory of each device",
            m.devices.free.clone(),
        );
        r.register(
            "moe_worker_device_memory_used_bytes",
            "Used memory of each device (total minus free, all processes)",
            m.devices.used.clone(),
        );
        r.register(
            "moe_worker_device_weight_bytes",
            "Model weight bytes this worker placed on each device",
            m.devices.weights.clone(),
        );
        r.register(
            "moe_worker_device_kv_bytes",
            "KV cache bytes this worker placed on each device",
            m.devices.kv.clone(),
        );
        r.register(
            "moe_worker_device_compute_bytes",
            "llama.cpp compute buffer bytes on each device (measured on accelerators)",
            m.devices.compute.clone(),
        );
        r.register(
            "moe_worker_device_process_bytes",
            "This process's memory on each device as the driver reports it (NVML, as nvidia-smi)",
            m.devices.process.clone(),
        );
        r.register(
            "moe_worker_device_overhead_bytes",
            "Process device memory not in weights, KV or compute buffers (CUDA context, pools)",
            m.devices.overhead.clone(),
        );
        r.register(
            "moe_worker_host_expert_bytes",
            "Routed-expert weight bytes kept in host memory by the offload profile",
            m.host_expert_bytes.clone(),
        );
        r.register(
            "moe_worker_state",
            "1 for the state the worker advertises (starting, ready, draining), 0 for the others",
            m.state.clone(),
        );
        r.register(
            "moe_worker_registered",
            "1 while the worker holds its etcd lease with its advert written, else 0",
            m.registered.clone(),
        );
        r.register(
            "moe_worker_registrations",
            "etcd leases granted: the first registration plus re-registrations after a lost lease",
            m.registrations.clone(),
        );
        r.register(
            "vllm:num_requests_waiting",
            "Requests waiting for admission (vLLM's name; same value as moe_worker_queue_depth)",
            m.vllm.waiting.clone(),
        );
        r.register(
            "vllm:num_requests_running",
            "Sequences in the batch (vLLM's name; same value as moe_worker_active_sequences)",
            m.vllm.running.clone(),
        );
        r.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage, 0 to 1 (vLLM's name; same value as moe_worker_kv_utilization)",
            m.vllm.kv_usage.clone(),
        );
        Arc::new(m)
    }

    /// A request ended before or after reaching the engine, with this gRPC status.
    pub fn request_finished(&self, code: tonic::Code) {
        self.requests
            .get_or_create(&OutcomeLabels {
                outcome: code_label(code),
            })
            .inc();
    }

    pub fn first_token(&self, class: Class, ttft: Duration, queue: Duration, prompt_tokens: u32) {
        let l = ClassLabels {
            class: class_label(class),
        };
        self.ttft.get_or_create(&l).observe(ttft.as_secs_f64());
        self.queue_wait
            .get_or_create(&l)
            .observe(queue.as_secs_f64());
        self.prompt_tokens.inc_by(prompt_tokens as u64);
    }

    /// `tokens` tokens streamed `gap` after the previous ones (None for the first).
    pub fn tokens(&self, class: Class, tokens: usize, gap: Option<Duration>) {
        if tokens == 0 {
            return;
        }
        let l = ClassLabels {
            class: class_label(class),
        };
        self.generated_tokens
            .get_or_create(&l)
            .inc_by(tokens as u64);
        if let Some(gap) = gap {
            let h = self.inter_token.get_or_create(&l);
            let each = gap.as_secs_f64() / tokens as f64;
            for _ in 0..tokens {
                h.observe(each);
            }
        }
    }

    fn engine(&self, stats: &EngineStats, last: &mut EngineCounts) {
        self.abandoned
            .inc_by(stats.cancelled_total.saturating_sub(last.abandoned));
        last.abandoned = stats.cancelled_total;
        self.llama_calls
            .inc_by(stats.llama_calls_total.saturating_sub(last.llama_calls));
        last.llama_calls = stats.llama_calls_total;
        self.stream_moves
            .inc_by(stats.stream_moves_total.saturating_sub(last.stream_moves));
        last.stream_moves = stats.stream_moves_total;
    }

    fn advert(&self, a: &WorkerAdvert) {
        let c = &a.capacity;
        self.queue_depth.set(a.load.queued as i64);
        self.active.set(a.load.active as i64);
        self.max_sequences.set(c.max_sequences as i64);
        self.kv_capacity.set(c.context_tokens as i64);
        self.kv_free.set(c.free_kv_tokens as i64);
        let used = c.context_tokens.saturating_sub(c.free_kv_tokens);
        self.kv_used.set(used as i64);
        self.kv_utilization
            .set(used as f64 / c.context_tokens.max(1) as f64);
        self.vllm.waiting.set(a.load.queued as i64);
        self.vllm.running.set(a.load.active as i64);
        self.vllm
            .kv_usage
            .set(used as f64 / c.context_tokens.max(1) as f64);
        self.decode_tps.set(a.speed.decode_tokens_per_second);
        self.prefill_tps.set(a.speed.prefill_tokens_per_second);
        self.host_expert_bytes
            .set(a.memory.host_expert_bytes as i64);
        for d in &a.devices {
            let l = DeviceLabels {
                device: d.name.clone(),
                kind: device_kind(d.kind),
            };
            let d_ = &self.devices;
            d_.total.get_or_create(&l).set(d.total_bytes as i64);
            d_.free.get_or_create(&l).set(d.free_bytes as i64);
            d_.used
                .get_or_create(&l)
                .set(d.total_bytes.saturating_sub(d.free_bytes) as i64);
            d_.weights.get_or_create(&l).set(d.weight_bytes as i64);
            d_.kv.get_or_create(&l).set(d.kv_bytes as i64);
            d_.compute.get_or_create(&l).set(d.compute_bytes as i64);
            if let Some(p) = d.process_bytes {
                d_.process.get_or_create(&l).set(p as i64);
                d_.overhead.get_or_create(&l).set(d.overhead_bytes as i64);
            }
        }
        for (state, label) in [
            (WorkerState::Starting, "starting"),
            (WorkerState::Ready, "ready"),
            (WorkerState::Draining, "draining"),
        ] {
            self.state
                .get_or_create(&StateLabels { state: label })
                .set((a.state == state) as i64);
        }
    }

    fn registration(&self, s: &RegistrationStatus, last_registrations: &mut u64) {
        self.registered.set(s.registered as i64);
        self.registrations
            .inc_by(s.registrations.saturating_sub(*last_registrations));
        *last_registrations = s.registrations;
    }
}

/// The engine's running totals the counters last caught up with.
#[derive(Default)]
struct EngineCounts {
    abandoned: u64,
    llama_calls: u64,
    stream_moves: u64,
}

fn device_kind(k: moe_common::registry::DeviceKind) -> &'static str {
    use moe_common::registry::DeviceKind::*;
    match k {
        Cpu => "cpu",
        Gpu => "gpu",
        IntegratedGpu => "integrated_gpu",
        Accelerator => "accelerator",
        Unknown => "unknown",
    }
}

/// Where the gauges come from.
pub struct Sources {
    pub stats: watch::Receiver<EngineStats>,
    pub advert: watch::Receiver<WorkerAdvert>,
    /// None when the worker runs unregistered.
    pub registration: Option<watch::Receiver<RegistrationStatus>>,
}

/// Keeps the gauges in step with their sources until `stop` is cancelled.
pub async fn follow(metrics: Arc<WorkerMetrics>, mut src: Sources, stop: CancellationToken) {
    let mut last_engine = EngineCounts::default();
    let mut last_registrations = 0;
    let (_never_tx, never) = watch::channel(RegistrationStatus::default());
    let mut registration = src.registration.take().unwrap_or(never);
    loop {
        metrics.engine(&src.stats.borrow_and_update(), &mut last_engine);
        metrics.advert(&src.advert.borrow_and_update());
        metrics.registration(&registration.borrow_and_update(), &mut last_registrations);
        tokio::select! {
            _ = stop.cancelled() => return,
            r = src.stats.changed() => if r.is_err() { return },
            r = src.advert.changed() => if r.is_err() { return },
            r = registration.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_common::telemetry::metrics::{assert_catalogued, encode};

    #[test]
    fn every_worker_metric_is_catalogued() {
        let mut registry = Registry::default();
        let m = WorkerMetrics::register(&mut registry, "w", "m", "full");
        m.request_finished(tonic::Code::Ok);
        m.first_token(Class::Batch, Duration::from_millis(5), Duration::ZERO, 3);
        m.tokens(Class::Batch, 2, Some(Duration::from_millis(10)));
        let mut advert = moe_common::registry::WorkerAdvert {
            schema: moe_common::registry::ADVERT_SCHEMA,
            id: "w".into(),
            endpoint: "http://127.0.0.1:1".into(),
            state: WorkerState::Ready,
            model: Default::default(),
            model_fingerprint: String::new(),
            decode_mode: None,
            batch_invariant: None,
            system_fingerprint: None,
            features: moe_common::registry::Features::all(),
            offload: Default::default(),
            devices: vec![moe_common::registry::DeviceInfo {
                name: "CUDA0".into(),
                description: "gpu".into(),
                kind: moe_common::registry::DeviceKind::Gpu,
                total_bytes: 100,
                free_bytes: 40,
                weight_bytes: 30,
                kv_bytes: 10,
                ..Default::default()
            }],
            memory: Default::default(),
            capacity: Default::default(),
            load: Default::default(),
            speed: Default::default(),
            version: "0".into(),
            updated_unix_ms: 0,
        };
        advert.capacity.context_tokens = 100;
        advert.capacity.free_kv_tokens = 25;
        advert.load.queued = 3;
        advert.load.active = 2;
        m.advert(&advert);
        m.engine(&EngineStats::default(), &mut EngineCounts::default());
        m.registration(
            &RegistrationStatus {
                registered: true,
                registrations: 1,
            },
            &mut 0,
        );
        let text = encode(&registry);
        let catalogue = include_str!("../../../docs/metrics.md");
        // The vllm: compatibility names are catalogued in their own table (checked below).
        let ours: String = text
            .lines()
            .filter(|l| !l.contains("vllm:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_catalogued(&ours, catalogue);
        for (name, value) in [
            ("vllm:num_requests_waiting", "3"),
            ("vllm:num_requests_running", "2"),
            ("vllm:kv_cache_usage_perc", "0.75"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} gauge")),
                "{name} is not a gauge: {text}"
            );
            let sample = format!("{name}{{worker=\"w\",model=\"m\",profile=\"full\"}} {value}");
            assert!(text.contains(&sample), "no {sample} in {text}");
            assert!(
                catalogue.contains(&format!("| `{name}` | gauge |")),
                "{name} is not in docs/metrics.md"
            );
        }
        assert!(text.contains(
            r#"moe_worker_device_memory_used_bytes{worker="w",model="m",profile="full",device="CUDA0",kind="gpu"} 60"#
        ), "{text}");
        assert!(
            text.contains(
                "moe_worker_kv_utilization{worker=\"w\",model=\"m\",profile=\"full\"} 0.75"
            ),
            "{text}"
        );
    }
}
