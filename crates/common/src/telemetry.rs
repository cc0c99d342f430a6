//! Telemetry set-up shared by the binaries: `RUST_LOG`-style filtering, human or JSON logs, and
//! optional OpenTelemetry trace export over OTLP/gRPC. `propagation` carries W3C trace context on
//! gRPC metadata; `metrics` serves a Prometheus registry over HTTP.
//!
//! Only binaries call [`init`]; the library `run()` functions never install global state, so a
//! test may install its own subscriber (for instance one built with [`otlp_layer`]).

pub mod metrics;
pub mod propagation;

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Trace export settings, flattened into each binary's configuration.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TelemetryConfig {
    /// OTLP/gRPC collector to export traces to, e.g. http://otel-collector:4317 (off when unset).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans (default: the binary's name).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
}

impl TelemetryConfig {
    /// Rejects endpoints the exporter cannot use (call from the binary's `validate()`).
    pub fn validate(&self) -> Result<(), String> {
        match self.otlp_endpoint.as_deref() {
            None | Some("") => Ok(()),
            Some(e) if e.starts_with("http://") && e.len() > "http://".len() => Ok(()),
            Some(e) => Err(format!(
                "--otlp-endpoint must be an http://host:port URL of an OTLP/gRPC collector, not {e:?}"
            )),
        }
    }

    fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().filter(|e| !e.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("starting the OTLP trace exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
}

/// Keeps the trace pipeline alive; flushes and shuts it down on [`TelemetryGuard::shutdown`] or
/// drop. Inert when export is off.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// A guard exporting nothing.
    pub fn disabled() -> Self {
        TelemetryGuard { provider: None }
    }

    /// Exports every finished span now (tests use this before asserting on a collector).
    pub fn flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }

    /// Flushes pending spans and stops the exporter.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("telemetry: shutting the trace exporter down: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An OpenTelemetry layer exporting spans to `endpoint` as `service`, and the guard that owns its
/// pipeline. Must be called inside a Tokio runtime (the gRPC channel lives on it).
pub fn otlp_layer<S>(
    endpoint: &str,
    service: &str,
) -> Result<
    (
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
        TelemetryGuard,
    ),
    TelemetryError,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    let resource = Resource::builder()
        .with_service_name(service.to_string())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            crate::VERSION,
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("moe-cluster");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false);
    Ok((
        layer,
        TelemetryGuard {
            provider: Some(provider),
        },
    ))
}

/// Installs the global subscriber: logs to stderr (`MOE_LOG_FORMAT=json` for JSON lines), filtered
/// by `RUST_LOG` (else `default_filter`), and, when an OTLP endpoint is configured, export of
/// every INFO-and-above span whatever `RUST_LOG` says. An exporter that cannot start is an error.
/// A second call installs nothing and returns an inert guard. Call inside a Tokio runtime.
pub fn init(
    service: &str,
    default_filter: &str,
    config: &TelemetryConfig,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("MOE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let logs = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let (otel, guard) = match config.endpoint() {
        Some(endpoint) => {
            let name = config.otel_service_name.as_deref().unwrap_or(service);
            let (layer, guard) = otlp_layer(endpoint, name)?;
            (Some(layer.with_filter(LevelFilter::INFO)), guard)
        }
        None => (None, TelemetryGuard::disabled()),
    };
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if !installed {
        return Ok(TelemetryGuard::disabled());
    }
    if let Some(endpoint) = config.endpoint() {
        tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_must_be_plain_http() {
        let c = |e: &str| TelemetryConfig {
            otlp_endpoint: Some(e.into()),
            otel_service_name: None,
        };
        assert!(c("http://collector:4317").validate().is_ok());
        assert!(TelemetryConfig::default().validate().is_ok());
        assert!(c("collector:4317").validate().is_err());
        assert!(c("https://collector:4317").validate().is_err());
    }

    #[tokio::test]
    async fn a_configured_exporter_starts_without_a_reachable_collector() {
        let (_layer, guard) =
            otlp_layer::<tracing_subscriber::Registry>("http://127.0.0.1:9", "t").expect("starts");
        guard.shutdown();
    }

    #[tokio::test]
    async fn an_unusable_endpoint_is_a_startup_error() {
        let r = otlp_layer::<tracing_subscriber::Registry>("https://127.0.0.1:9", "t");
        assert!(matches!(r, Err(TelemetryError::Exporter { .. })));
    }
}
