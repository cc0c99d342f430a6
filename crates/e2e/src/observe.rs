//! Observability helpers for tests: an OTLP/gRPC trace collector that keeps what it receives,
//! process-wide trace export to it for in-process gateways and workers, and a Prometheus text
//! scraper and parser.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// One span as a collector received it, with ids as lowercase hex.
#[derive(Clone, Debug)]
pub struct ExportedSpan {
    /// The `service.name` resource attribute.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// (trace id, span id) of each linked span.
    pub links: Vec<(String, String)>,
    pub attributes: BTreeMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

#[derive(Clone, Default)]
struct Store(Arc<Mutex<Vec<ExportedSpan>>>);

#[tonic::async_trait]
impl TraceService for Store {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock().expect("collector lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(|kv| text(&kv.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(ExportedSpan {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        links: s
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), text(&kv.value)))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC trace collector on a free loopback port, keeping every span it receives.
pub struct Collector {
    pub addr: SocketAddr,
    store: Store,
}

impl Collector {
    /// Starts the collector on the current Tokio runtime.
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let store = Store::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(store.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        Collector { addr, store }
    }

    /// `http://127.0.0.1:PORT`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ExportedSpan> {
        self.store.0.lock().expect("collector lock").clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ExportedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

/// Trace export of this whole test process to one collector: both live on a runtime of their
/// own, so they outlive each test's runtime.
pub struct ProcessTracing {
    pub collector: Collector,
    guard: moe_common::telemetry::TelemetryGuard,
    _runtime: tokio::runtime::Runtime,
}

impl ProcessTracing {
    /// Exports every finished span now.
    pub async fn flush(&'static self) {
        tokio::task::spawn_blocking(move || self.guard.flush())
            .await
            .expect("flush");
    }
}

/// Installs (once) the global subscriber exporting this process's spans, as service
/// `moe-e2e`, to a collector started for the purpose.
pub fn process_tracing() -> &'static ProcessTracing {
    static TRACING: OnceLock<ProcessTracing> = OnceLock::new();
    TRACING.get_or_init(|| {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        // Built on a thread of its own: tests call this from inside their runtime, where
        // blocking on another one is not allowed.
        let (runtime, collector, layer, guard) = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tracing runtime");
            let (collector, layer, guard) = runtime.block_on(async {
                let collector = Collector::start().await;
                let (layer, guard) = moe_common::telemetry::otlp_layer::<
                    tracing_subscriber::Registry,
                >(&collector.endpoint(), "moe-e2e")
                .expect("OTLP layer");
                (collector, layer, guard)
            });
            (runtime, collector, layer, guard)
        })
        .join()
        .expect("tracing set-up");
        tracing_subscriber::registry()
            .with(layer.with_filter(tracing_subscriber::filter::LevelFilter::INFO))
            .try_init()
            .expect("no other global subscriber in this test binary");
        ProcessTracing {
            collector,
            guard,
            _runtime: runtime,
        }
    })
}

/// One sample of a Prometheus text exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus / OpenMetrics text format (comments skipped; no timestamps expected).
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("no value in {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .map_err(|e| format!("bad value in {line:?}: {e}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .ok_or_else(|| format!("unterminated labels in {line:?}"))?;
                (name.to_string(), parse_labels(body)?)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

fn parse_labels(body: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return Err(format!("label {key} has no quoted value in {body:?}"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => return Err(format!("dangling escape in {body:?}")),
                },
                Some('"') => break,
                Some(c) => value.push(c),
                None => return Err(format!("unterminated value in {body:?}")),
            }
        }
        labels.insert(key.trim().to_string(), value);
        match chars.next() {
            Some(',') | None => {}
            Some(c) => return Err(format!("unexpected {c:?} in {body:?}")),
        }
    }
    Ok(labels)
}

/// A parsed scrape.
#[derive(Clone, Debug)]
pub struct Metrics(pub Vec<Sample>);

impl Metrics {
    /// Sum of the samples named `name` whose labels include every `(key, value)` of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }
}

/// GETs `http://addr/metrics` and parses it (bounded by 10 s).
pub async fn scrape(addr: SocketAddr) -> Metrics {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        s.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("scrape within 10 s")
        .expect("scrape");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
    Metrics(parse_metrics(body).expect("Prometheus text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openmetrics_text() {
        let text = "# HELP moe_requests Requests.\n# TYPE moe_requests counter\n\
moe_requests_total{model=\"m\",class=\"batch\",outcome=\"ok\"} 3\n\
moe_x_bucket{le=\"+Inf\",a=\"q\\\"uote\"} 1\nmoe_g 0.5\n# EOF\n";
        let m = Metrics(parse_metrics(text).unwrap());
        assert_eq!(m.sum("moe_requests_total", &[("outcome", "ok")]), 3.0);
        assert_eq!(m.sum("moe_requests_total", &[("outcome", "error")]), 0.0);
        assert_eq!(m.sum("moe_x_bucket", &[("a", "q\"uote")]), 1.0);
        assert_eq!(m.sum("moe_g", &[]), 0.5);
    }
}
