//! W3C trace context (`traceparent`, `tracestate`) on gRPC metadata: inject on outgoing requests,
//! extract on incoming ones. Uses a propagator value, not the global one, so nothing depends on
//! process-wide set-up.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes `span`'s trace context into outgoing metadata. No-op when the span is not exported.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// Makes the caller's span (from incoming metadata) the parent of `span`, which must not have
/// been entered yet. Returns whether the metadata carried a valid trace context.
pub fn adopt_remote_parent(span: &tracing::Span, metadata: &MetadataMap) -> bool {
    let cx = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// The `traceparent` value that makes a request a child of (`trace_id`, `span_id`), both as hex;
/// clients and tests use it to start a trace of their own.
pub fn traceparent(trace_id: &str, span_id: &str) -> String {
    format!("00-{trace_id}-{span_id}-01")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn context_round_trips_through_metadata() {
        use opentelemetry::trace::TracerProvider as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let mut incoming = MetadataMap::new();
            let tp = traceparent("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
            incoming.insert("traceparent", tp.parse().unwrap());
            let server = tracing::info_span!("server");
            assert!(adopt_remote_parent(&server, &incoming));
            let mut outgoing = MetadataMap::new();
            inject(&server, &mut outgoing);
            let sent = outgoing.get("traceparent").unwrap().to_str().unwrap();
            assert!(
                sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                "{sent}"
            );
            assert!(!sent.contains("b7ad6b7169203331"), "a new span id: {sent}");
        });
    }

    #[test]
    fn missing_context_leaves_the_span_alone() {
        let span = tracing::Span::none();
        assert!(!adopt_remote_parent(&span, &MetadataMap::new()));
        let mut out = MetadataMap::new();
        inject(&span, &mut out);
        assert!(out.is_empty());
    }
}
