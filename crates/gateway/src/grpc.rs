//! The gateway's gRPC front: which checks run before a request body is read, and which services
//! sit behind the request-decoding limit. API keys are checked on the headers (an interceptor),
//! so an unauthenticated client is refused before its body is read or decoded (review H1). At
//! most `max_decoding` `Generate` requests are read and decoded at once, and any beyond that are
//! refused at once with RESOURCE_EXHAUSTED instead of queueing; this bounds the request bytes in
//! flight to about `max_decoding × max_message_bytes`. Health and reflection sit outside that
//! limit, so probes answer while it is saturated (M7), and a request whose body has not arrived
//! within `read_timeout` is refused (DEADLINE_EXCEEDED), freeing its permit. A request holds its
//! permit only until its body is decoded ([`DecodePlace`], released by the service before it
//! sizes the prompt with a worker's `Tokenize` and places it): it then holds a place of
//! `--max-concurrency` instead (`GatewayService::start_sized`), so a burst of requests whose
//! sizing is slow is not refused while the workers have room. Refusals are counted
//! (`moe_gateway_decoding_refused_total`, docs/metrics.md) and logged (debug, and a rate-limited
//! warning). HTTP/2 keepalive pings close half-open client connections (H6), and
//! `max_concurrent_streams` bounds streams per connection. The `moe.v1.Inference` health status stays NOT_SERVING until the registry has been
//! listed once ([`serve_once_synced`]).
//!
//! Part of the decoding limit is INTERACTIVE's (`--interactive-reserved-decoding`, issue 16): the
//! class is in the body, which is not read yet when a permit is taken, so a request that finds
//! the shared permits gone is read under the reserve and marked [`InteractiveReserve`]; once
//! decoded, the service refuses it at once (RESOURCE_EXHAUSTED) unless it is INTERACTIVE. BATCH
//! requests can therefore hold the reserve only for as long as their bodies take to arrive and
//! be decoded, and the bytes in flight stay bounded by the whole limit.
//!
//! Draining (issue 16): once `drain` is cancelled, `Generate` calls are answered at once with
//! UNAVAILABLE and the retry hint ([`draining`]) instead of being started. `crate::run` keeps
//! the listener accepting for a short window ([`DRAIN_ACCEPT_WINDOW`]) before tonic's graceful
//! shutdown (GOAWAY, listener closed), so a connection that was in the accept backlog when
//! SIGTERM came gets that answer rather than a reset.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use moe_common::pb::v1::inference_server::InferenceServer;
use moe_common::registry::ClusterSnapshot;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::Router;

use crate::auth::{ApiKeys, grpc_bearer};
use crate::metrics::{DecodingRefusal, GatewayMetrics};
use crate::proxy::GatewayService;

/// Limits of the gRPC server.
#[derive(Clone, Debug)]
pub struct GrpcLimits {
    /// `Generate` requests read and decoded at once; more are refused (RESOURCE_EXHAUSTED).
    pub max_decoding: usize,
    /// Of `max_decoding`, how many only INTERACTIVE requests may keep (at most `max_decoding - 1`).
    pub interactive_reserved_decoding: usize,
    /// Largest request message accepted (bytes, before decoding).
    pub max_message_bytes: usize,
    /// Longest a `Generate` request may take to arrive (body read, decoded, sized and placed;
    /// its decoding permit is given back once it is decoded).
    pub read_timeout: Duration,
    /// HTTP/2 streams open at once per client connection.
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl GrpcLimits {
    pub fn from_config(config: &crate::GatewayConfig) -> Self {
        GrpcLimits {
            max_decoding: config.max_decoding_requests,
            interactive_reserved_decoding: config.interactive_reserved_decoding(),
            max_message_bytes: config.limits.max_message_bytes,
            read_timeout: config.request_read_timeout,
            max_concurrent_streams: config.max_concurrent_streams,
            keepalive_interval: config.keepalive_interval,
            keepalive_timeout: config.keepalive_timeout,
        }
    }
}

/// How long the gRPC listener keeps accepting once the drain began (capped by `--drain-grace`),
/// answering new `Generate` calls [`draining`]; the HTTP API's window is the same
/// (`crate::http::drain::DRAIN_ACCEPT_WINDOW`).
pub const DRAIN_ACCEPT_WINDOW: Duration = crate::http::drain::DRAIN_ACCEPT_WINDOW;

/// UNAVAILABLE for a `Generate` call that arrives while the gateway drains: nothing was started
/// for it, so the client may retry it on another gateway at once; `retry-after-ms` and
/// `grpc-retry-pushback-ms` say so ([`crate::admission::RETRY_HINT`]).
pub fn draining() -> Status {
    let ms = tonic::metadata::MetadataValue::from(crate::admission::RETRY_HINT.as_millis() as u64);
    let mut md = tonic::metadata::MetadataMap::new();
    md.insert(crate::auth::RETRY_AFTER_MS, ms.clone());
    md.insert(crate::admission::GRPC_RETRY_PUSHBACK_MS, ms);
    Status::with_metadata(
        tonic::Code::Unavailable,
        "the gateway is draining (shutting down) and takes no new requests; retry on another \
         gateway",
        md,
    )
}

/// The gRPC router of a gateway: `Generate` behind the API-key interceptor and the decoding
/// limit; `extra` services (health, reflection) beside them, unlimited.
pub fn router(
    limits: &GrpcLimits,
    service: GatewayService,
    api_keys: Option<Arc<ApiKeys>>,
) -> Router {
    router_draining(limits, service, api_keys, CancellationToken::new())
}

/// [`router`], answering `Generate` calls [`draining`] once `drain` is cancelled.
pub fn router_draining(
    limits: &GrpcLimits,
    service: GatewayService,
    api_keys: Option<Arc<ApiKeys>>,
    drain: CancellationToken,
) -> Router {
    let reserved = limits
        .interactive_reserved_decoding
        .min(limits.max_decoding.saturating_sub(1));
    let metrics = service.metrics().clone();
    let inference = DecodeLimit {
        inner: InferenceServer::new(service).max_decoding_message_size(limits.max_message_bytes),
        shared: Arc::new(Semaphore::new(limits.max_decoding - reserved)),
        reserve: Arc::new(Semaphore::new(reserved)),
        read_timeout: limits.read_timeout,
        drain,
        metrics,
    };
    let inference = InterceptedService::new(inference, move |req: tonic::Request<()>| {
        if let Some(keys) = &api_keys {
            keys.authenticate(grpc_bearer(req.metadata()))?;
        }
        Ok(req)
    });
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .add_service(inference)
}

/// Keeps the gateway's `moe.v1.Inference` health NOT_SERVING until `snapshots` holds a listed
/// registry (revision > 0: a gateway started while etcd is down knows no workers, review H7), then
/// sets it SERVING, unless `stop` (drain) came first. Readiness probes ask for that service; the
/// server's overall status ("") stays SERVING, so a liveness probe does not restart a gateway
/// that waits for etcd.
pub async fn serve_once_synced(
    reporter: tonic_health::server::HealthReporter,
    mut snapshots: watch::Receiver<Arc<ClusterSnapshot>>,
    stop: CancellationToken,
) {
    reporter
        .set_not_serving::<InferenceServer<GatewayService>>()
        .await;
    let synced = tokio::select! {
        biased;
        () = stop.cancelled() => false,
        r = snapshots.wait_for(|s| s.revision > 0) => r.is_ok(),
    };
    if synced && !stop.is_cancelled() {
        tracing::info!("registry listed: health SERVING");
        reporter
            .set_serving::<InferenceServer<GatewayService>>()
            .await;
    }
}

/// Marks a `Generate` call read under the INTERACTIVE reserve of the decoding limit: the
/// service refuses it once decoded unless it is INTERACTIVE (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct InteractiveReserve;

/// The refusal of a decoded BATCH request that was read under the INTERACTIVE reserve.
pub fn batch_over_its_decoding_share() -> Status {
    crate::admission::exhausted(
        "gateway is reading as many requests as BATCH may at once (--max-decoding-requests less \
         --interactive-reserved-decoding)",
    )
}

/// A `Generate` call's permit of the decoding limit, in the request's extensions: the service
/// gives it back ([`DecodePlace::release`]) as soon as the body is decoded, before it sizes the
/// prompt (a worker's `Tokenize`, up to `--tokenize-timeout`) and places the request, so that
/// the limit bounds the bodies being read and decoded, not the requests being placed. Released
/// at the latest when the call's response headers are ready (a body that fails to decode).
#[derive(Clone)]
pub struct DecodePlace(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl DecodePlace {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        DecodePlace(Arc::new(Mutex::new(Some(permit))))
    }

    /// Gives the permit back (once; later calls do nothing).
    pub fn release(&self) {
        let permit = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(permit);
    }
}

/// Admits at most as many calls as it has permits, each holding one until its body is decoded
/// ([`DecodePlace`]; at the latest until its response headers are ready); refuses the rest with
/// RESOURCE_EXHAUSTED, and a call not ready within `read_timeout` with DEADLINE_EXCEEDED.
/// Calls take `shared` permits first, then `reserve` ones (marked [`InteractiveReserve`]).
/// Refusals go to `moe_gateway_decoding_refused_total` ([`GatewayMetrics::decoding_refused`]).
#[derive(Clone)]
pub struct DecodeLimit<S> {
    inner: S,
    shared: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    read_timeout: Duration,
    /// Cancelled when the gateway drains: calls are answered [`draining`].
    drain: CancellationToken,
    metrics: Arc<GatewayMetrics>,
}

impl<S: NamedService> NamedService for DecodeLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for DecodeLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if self.drain.is_cancelled() {
            return Box::pin(std::future::ready(Ok(draining().into_http())));
        }
        let permit = self.shared.clone().try_acquire_owned().or_else(|_| {
            let p = self.reserve.clone().try_acquire_owned()?;
            req.extensions_mut().insert(InteractiveReserve);
            Ok::<_, tokio::sync::TryAcquireError>(p)
        });
        match permit {
            Ok(permit) => {
                let place = DecodePlace::new(permit);
                req.extensions_mut().insert(place.clone());
                let call = self.inner.call(req);
                let read_timeout = self.read_timeout;
                let metrics = self.metrics.clone();
                Box::pin(async move {
                    // Dropping the call on timeout drops the body: the stream is reset.
                    let response = tokio::time::timeout(read_timeout, call).await;
                    place.release();
                    response.unwrap_or_else(|_| {
                        metrics.decoding_refused("grpc", DecodingRefusal::ReadTimeout);
                        Ok(Status::deadline_exceeded(format!(
                            "the request did not arrive within {read_timeout:?}"
                        ))
                        .into_http())
                    })
                })
            }
            Err(_) => {
                self.metrics
                    .decoding_refused("grpc", DecodingRefusal::Limit);
                let status = crate::admission::exhausted(
                    "gateway is reading as many requests as it may at once (--max-decoding-requests)",
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}
