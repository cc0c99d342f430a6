//! Prometheus exposition shared by the binaries: each `run()` builds one registry (names from the
//! catalogue in docs/metrics.md) and serves it here at `GET /metrics` in the text format.

use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry in the OpenMetrics text format (which Prometheus scrapes natively).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// Serves `registry` at `/metrics` until `shutdown` is cancelled.
pub async fn serve(
    registry: Arc<Registry>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move { ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], encode(&registry)) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the metrics listener, naming the address in the error.
pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding the metrics listener on {addr}: {e}"),
        )
    })
}

/// Binds `addr` (when set) and serves `/metrics` from `registry` in the background until
/// `shutdown`; None when no address is configured.
pub async fn spawn(
    addr: Option<std::net::SocketAddr>,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = bind(addr).await?;
    tracing::info!(metrics = %listener.local_addr()?, "serving /metrics");
    Ok(Some(tokio::spawn(serve(
        Arc::new(registry),
        listener,
        shutdown,
    ))))
}

/// A bounded `outcome` label value for a gRPC status code (`ok`, `unavailable`, …).
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// Buckets for request-level latencies (time to first token, queue wait): 5 ms to 2 min.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
    .into_iter()
}

/// Buckets for per-token latencies: 1 ms to 5 s.
pub fn token_latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    ]
    .into_iter()
}

/// Metric families in `encode`'s output as (name as queried, type): counters get their `_total`
/// sample name. Tests compare this with docs/metrics.md.
pub fn families(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| {
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            (name, kind.to_string())
        })
        .collect()
}

/// The catalogue in docs/metrics.md as (name, type) rows of its tables.
pub fn catalogue(markdown: &str) -> Vec<(String, String)> {
    markdown
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // | `name` | type | unit | labels | meaning |
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = *cells.get(2)?;
            name.starts_with("moe_")
                .then(|| (name.to_string(), kind.to_string()))
        })
        .collect()
}

/// Asserts every family in `text` is catalogued in `markdown` with the same type (unit tests of
/// the binaries' registries).
pub fn assert_catalogued(text: &str, markdown: &str) {
    let catalogue = catalogue(markdown);
    let families = families(text);
    assert!(!families.is_empty(), "no metric families in:\n{text}");
    for (name, kind) in families {
        assert!(
            catalogue.iter().any(|(n, k)| *n == name && *k == kind),
            "metric {name} ({kind}) is not in docs/metrics.md"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn families_name_counters_with_their_total_suffix() {
        let mut r = Registry::default();
        r.register("moe_x", "x", Counter::<u64>::default());
        let text = encode(&r);
        assert_eq!(
            families(&text),
            vec![("moe_x_total".to_string(), "counter".to_string())]
        );
        assert_catalogued(&text, "| `moe_x_total` | counter | 1 | — | x |");
    }

    #[tokio::test]
    async fn serves_the_registry_over_http() {
        let mut r = Registry::default();
        let c = Counter::<u64>::default();
        r.register("moe_served", "x", c.clone());
        c.inc_by(3);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(Arc::new(r), listener, stop.clone()));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("moe_served_total 3"), "{body}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
