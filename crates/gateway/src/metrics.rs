//! The gateway's Prometheus metrics (names and labels as catalogued in docs/metrics.md): request
//! outcomes and latencies as clients see them, scheduler decisions, retries, migrations, and the
//! registry as this gateway's watcher sees it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_common::registry::ClusterSnapshot;
use moe_common::telemetry::metrics::{code_label, latency_buckets, token_latency_buckets};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::scheduler::{Decision, ScheduleError};
use moe_common::LatencyClass;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub model: String,
    pub class: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub model: String,
    pub class: &'static str,
    pub profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub class: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpillLabels {
    pub class: &'static str,
    pub profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub class: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SizingLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecodingRefusalLabels {
    pub front: &'static str,
    pub reason: &'static str,
}

/// Why the request-decoding limit (`--max-decoding-requests`; over HTTP the body budget) refused
/// a request before it reached the service (`moe_gateway_decoding_refused_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodingRefusal {
    /// Every place was taken (the class was not known yet): RESOURCE_EXHAUSTED / 429.
    Limit,
    /// A BATCH request over its share: read under the INTERACTIVE reserve, or (HTTP) declared
    /// `batch` in its header when the shared places were gone: RESOURCE_EXHAUSTED / 429.
    BatchShare,
    /// The body did not arrive within `--request-read-timeout`: DEADLINE_EXCEEDED / 408.
    ReadTimeout,
}

impl DecodingRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodingRefusal::Limit => "limit",
            DecodingRefusal::BatchShare => "batch_share",
            DecodingRefusal::ReadTimeout => "read_timeout",
        }
    }
}

/// Refusals of the decoding limit are logged at debug each, and as a warning at most this often
/// (with the count since the last one), so a burst does not flood the log.
const DECODING_REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerPoolLabels {
    pub profile: String,
    pub state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct GatewayMetrics {
    requests: Family<OutcomeLabels, Counter>,
    ttft: HistogramFamily<StreamLabels>,
    inter_token: HistogramFamily<StreamLabels>,
    tokens: Family<StreamLabels, Counter>,
    in_flight: Gauge,
    decisions: Family<DecisionLabels, Counter>,
    spillovers: Family<SpillLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    migrations: Family<ClassLabels, Counter>,
    retry_budget_exhausted: Counter,
    worker_ejections: Counter,
    workers: Family<WorkerPoolLabels, Gauge>,
    rejected_adverts: Gauge,
    prompt_sizing: Family<SizingLabels, Counter>,
    prefix_hits: Family<ClassLabels, Counter>,
    prefix_cached_tokens: Family<ClassLabels, Counter>,
    decoding_refused: Family<DecodingRefusalLabels, Counter>,
    /// When the last decoding-refusal warning was logged, and refusals since.
    decoding_refused_log: Mutex<(Option<Instant>, u64)>,
}

fn schedule_error_label(e: &ScheduleError) -> &'static str {
    match e {
        ScheduleError::ModelNotFound(_) => "model_not_found",
        ScheduleError::Unavailable(_) => "unavailable",
        ScheduleError::TooLarge { .. } => "too_large",
        ScheduleError::NoHeadroom { .. } => "no_headroom",
        ScheduleError::PromptTooLong { .. } => "prompt_too_long",
        ScheduleError::NotBatchInvariant { .. } => "not_batch_invariant",
    }
}

impl GatewayMetrics {
    /// Registers every gateway metric in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self::unregistered();
        registry.register(
            "moe_requests",
            "Requests finished at the gateway, by outcome (ok, cancelled, or the gRPC status)",
            m.requests.clone(),
        );
        registry.register(
            "moe_time_to_first_token_seconds",
            "From a request's arrival at the gateway to its first token sent to the client",
            m.ttft.clone(),
        );
        registry.register(
            "moe_inter_token_latency_seconds",
            "Time between tokens relayed to the client (one observation per token)",
            m.inter_token.clone(),
        );
        registry.register(
            "moe_generated_tokens",
            "Completion tokens relayed to clients",
            m.tokens.clone(),
        );
        registry.register(
            "moe_gateway_in_flight_requests",
            "Streams this gateway is proxying now",
            m.in_flight.clone(),
        );
        registry.register(
            "moe_scheduler_decisions",
            "Placements (preferred, spill, fallback) and placement failures (model_not_found, unavailable, too_large, no_headroom)",
            m.decisions.clone(),
        );
        registry.register(
            "moe_spillovers",
            "Placements onto the pool the request's class does not prefer, by the profile chosen",
            m.spillovers.clone(),
        );
        registry.register(
            "moe_retries",
            "Attempts on another worker before the first token, by the failed attempt's status",
            m.retries.clone(),
        );
        registry.register(
            "moe_migrations",
            "Streams moved to another worker after tokens were sent",
            m.migrations.clone(),
        );
        registry.register(
            "moe_retry_budget_exhausted",
            "Retries or migrations refused because the retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        registry.register(
            "moe_worker_ejections",
            "Workers left out of placement for a while after consecutive failed attempts",
            m.worker_ejections.clone(),
        );
        registry.register(
            "moe_registry_workers",
            "Workers in this gateway's registry snapshot, by offload profile and state",
            m.workers.clone(),
        );
        registry.register(
            "moe_registry_rejected_adverts",
            "Adverts in etcd this gateway ignores because they are invalid",
            m.rejected_adverts.clone(),
        );
        registry.register(
            "moe_prompt_sizing",
            "Requests sized for placement by a worker's tokenizer (tokenizer) or by the bytes/3 estimate (estimate)",
            m.prompt_sizing.clone(),
        );
        registry.register(
            "moe_prefix_hits",
            "First placements onto a worker whose prefix cache holds at least one block of the prompt",
            m.prefix_hits.clone(),
        );
        registry.register(
            "moe_prefix_cached_tokens_predicted",
            "Prompt tokens the chosen workers held in their prefix caches at placement, per the gateway's prefix index",
            m.prefix_cached_tokens.clone(),
        );
        registry.register(
            "moe_gateway_decoding_refused",
            "Requests refused by the request-decoding limit (--max-decoding-requests; over HTTP the body budget) before they reached placement, by front and reason (limit, batch_share, read_timeout)",
            m.decoding_refused.clone(),
        );
        Arc::new(m)
    }

    /// Metrics that count but are exported nowhere (services built without a registry).
    pub fn unregistered() -> Self {
        GatewayMetrics {
            requests: Family::default(),
            ttft: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            inter_token: Family::new_with_constructor(|| Histogram::new(token_latency_buckets())),
            tokens: Family::default(),
            in_flight: Gauge::default(),
            decisions: Family::default(),
            spillovers: Family::default(),
            retries: Family::default(),
            migrations: Family::default(),
            retry_budget_exhausted: Counter::default(),
            worker_ejections: Counter::default(),
            workers: Family::default(),
            rejected_adverts: Gauge::default(),
            prompt_sizing: Family::default(),
            prefix_hits: Family::default(),
            prefix_cached_tokens: Family::default(),
            decoding_refused: Family::default(),
            decoding_refused_log: Mutex::new((None, 0)),
        }
    }

    /// A request refused by the decoding limit of `front` ("grpc" or "http") before it reached
    /// the service's placement: counted, logged at debug, and warned about at most every
    /// [`DECODING_REFUSAL_WARN_EVERY`].
    pub fn decoding_refused(&self, front: &'static str, reason: DecodingRefusal) {
        let reason = reason.as_str();
        self.decoding_refused
            .get_or_create(&DecodingRefusalLabels { front, reason })
            .inc();
        tracing::debug!(
            front,
            reason,
            "request refused by the request-decoding limit"
        );
        let since = {
            let mut log = self
                .decoding_refused_log
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            log.1 += 1;
            let now = Instant::now();
            if log
                .0
                .is_some_and(|last| now.duration_since(last) < DECODING_REFUSAL_WARN_EVERY)
            {
                return;
            }
            log.0 = Some(now);
            std::mem::take(&mut log.1)
        };
        tracing::warn!(
            front,
            reason,
            refused = since,
            "requests refused by the request-decoding limit (--max-decoding-requests, \
             --interactive-reserved-decoding, --request-read-timeout); see \
             moe_gateway_decoding_refused_total"
        );
    }

    pub fn request_finished(&self, model: &str, class: LatencyClass, code: tonic::Code) {
        self.requests
            .get_or_create(&OutcomeLabels {
                model: model.to_string(),
                class: class.as_str(),
                outcome: code_label(code),
            })
            .inc();
    }

    pub fn first_token(&self, labels: &StreamLabels, seconds: f64) {
        self.ttft.get_or_create(labels).observe(seconds);
    }

    /// `tokens` tokens arrived `gap` seconds after the previous ones.
    pub fn tokens(&self, labels: &StreamLabels, tokens: u64, gap: Option<f64>) {
        self.tokens.get_or_create(labels).inc_by(tokens);
        if let Some(gap) = gap
            && tokens > 0
        {
            let h = self.inter_token.get_or_create(labels);
            for _ in 0..tokens {
                h.observe(gap / tokens as f64);
            }
        }
    }

    /// Counts a stream until the returned guard drops.
    pub fn in_flight(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.inc();
        InFlightGuard(self.clone())
    }

    pub fn placed(&self, class: LatencyClass, decision: Decision, profile: &str) {
        let d = decision.as_str();
        self.decisions
            .get_or_create(&DecisionLabels {
                class: class.as_str(),
                decision: d,
            })
            .inc();
        if decision != Decision::Preferred {
            self.spillovers
                .get_or_create(&SpillLabels {
                    class: class.as_str(),
                    profile: profile.to_string(),
                })
                .inc();
        }
    }

    pub fn placement_failed(&self, class: LatencyClass, e: &ScheduleError) {
        self.decisions
            .get_or_create(&DecisionLabels {
                class: class.as_str(),
                decision: schedule_error_label(e),
            })
            .inc();
    }

    pub fn retry(&self, class: LatencyClass, after: tonic::Code) {
        self.retries
            .get_or_create(&RetryLabels {
                class: class.as_str(),
                reason: code_label(after),
            })
            .inc();
    }

    pub fn migration(&self, class: LatencyClass) {
        self.migrations
            .get_or_create(&ClassLabels {
                class: class.as_str(),
            })
            .inc();
    }

    pub fn retry_budget_exhausted(&self) {
        self.retry_budget_exhausted.inc();
    }

    pub fn worker_ejected(&self) {
        self.worker_ejections.inc();
    }

    /// A request was sized by `source`: "tokenizer" or "estimate".
    pub fn prompt_sized(&self, source: &'static str) {
        self.prompt_sizing
            .get_or_create(&SizingLabels { source })
            .inc();
    }

    /// A first placement onto a worker holding `cached` prompt tokens (0: no hit).
    pub fn prefix_placement(&self, class: LatencyClass, cached: u32) {
        if cached == 0 {
            return;
        }
        let labels = ClassLabels {
            class: class.as_str(),
        };
        self.prefix_hits.get_or_create(&labels).inc();
        self.prefix_cached_tokens
            .get_or_create(&labels)
            .inc_by(u64::from(cached));
    }

    /// Sets the registry gauges from a new snapshot.
    pub fn snapshot(&self, snapshot: &ClusterSnapshot) {
        let mut counts: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
        for w in snapshot.workers.values() {
            let state = w.state.as_str();
            *counts
                .entry((w.offload.profile.clone(), state))
                .or_default() += 1;
        }
        // Profiles that emptied read 0 rather than vanishing mid-graph.
        self.workers.clear();
        for ((profile, state), n) in counts {
            self.workers
                .get_or_create(&WorkerPoolLabels { profile, state })
                .set(n);
        }
        self.rejected_adverts.set(snapshot.rejected.len() as i64);
    }
}

/// Decrements `moe_gateway_in_flight_requests` when dropped.
pub struct InFlightGuard(Arc<GatewayMetrics>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_common::telemetry::metrics::{assert_catalogued, encode};

    #[test]
    fn every_gateway_metric_is_catalogued() {
        let mut registry = Registry::default();
        let m = GatewayMetrics::register(&mut registry);
        // Touch every family so it shows up in the output.
        m.request_finished("m", LatencyClass::Interactive, tonic::Code::Ok);
        let labels = StreamLabels {
            model: "m".into(),
            class: "interactive",
            profile: "full".into(),
        };
        m.first_token(&labels, 0.1);
        m.tokens(&labels, 2, Some(0.02));
        m.placed(LatencyClass::Batch, Decision::Spill, "full");
        m.retry(LatencyClass::Batch, tonic::Code::Unavailable);
        m.migration(LatencyClass::Batch);
        m.prompt_sized("tokenizer");
        m.prefix_placement(LatencyClass::Interactive, 64);
        m.decoding_refused("grpc", DecodingRefusal::Limit);
        m.snapshot(&ClusterSnapshot::default());
        let docs = include_str!("../../../docs/metrics.md");
        assert_catalogued(&encode(&registry), docs);
    }

    #[test]
    fn inter_token_latency_is_observed_per_token() {
        let m = GatewayMetrics::unregistered();
        let labels = StreamLabels {
            model: "m".into(),
            class: "batch",
            profile: "cpu-moe".into(),
        };
        m.tokens(&labels, 4, Some(0.4));
        let mut registry = Registry::default();
        registry.register("itl", "x", m.inter_token.clone());
        let text = moe_common::telemetry::metrics::encode(&registry);
        assert!(
            text.contains("itl_count{model=\"m\",class=\"batch\",profile=\"cpu-moe\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("itl_sum{model=\"m\",class=\"batch\",profile=\"cpu-moe\"} 0.4"),
            "{text}"
        );
    }
}
