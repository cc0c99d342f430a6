//! What the HTTP API does with a completion request before its JSON is parsed (review H1, M7):
//! the API key is checked on the request head, so an unauthenticated client is refused with 401
//! before a byte of its body is read; the body's bytes are reserved from one budget shared by
//! every request being read (its `Content-Length`, or the largest body accepted when it sends
//! none), and a request that finds the budget spent is refused at once with 429 instead of
//! queueing; the body must arrive within the read timeout (408 otherwise), so a slow upload
//! holds its reservation for a bounded time. The reservation is released once the body has been
//! parsed ([`BodyPermit`], taken by `OpenAiJson`), before the prompt is sized (a worker's
//! `Tokenize`) and placed. Health and model listing do not pass through here, so they answer
//! while the budget is spent. Refusals (429 and 408) are counted in
//! `moe_gateway_decoding_refused_total{front="http"}` once [`Intake::with_metrics`] is set.
//!
//! Part of the budget is INTERACTIVE's (`--interactive-reserved-decoding` places' worth of
//! bytes, issue 16). A request that finds the shared bytes gone is read under the reserve unless
//! its `x-moe-latency-class` header says `batch`, and is marked [`InteractiveReserve`]; the
//! handler refuses it with 429 once parsed unless its class is INTERACTIVE.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::ApiError;
use crate::auth::{ApiKeys, bearer};
use crate::metrics::{DecodingRefusal, GatewayMetrics};

/// Largest request body accepted (the prompt limit applies after parsing).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Limits of the HTTP API's intake.
#[derive(Clone, Debug)]
pub struct IntakeLimits {
    /// Largest body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Body bytes being read and parsed at once, over all requests (429 beyond).
    pub max_bytes_in_flight: usize,
    /// Of `max_bytes_in_flight`, the bytes only INTERACTIVE requests may keep (see the module
    /// docs); capped so that any class can still read one largest body.
    pub interactive_reserved_bytes: usize,
    /// Longest a body may take to arrive (408 beyond).
    pub read_timeout: Duration,
}

impl IntakeLimits {
    /// The gRPC front's bounds applied to HTTP: bytes in flight at most
    /// `--max-decoding-requests` × `--max-message-bytes`, and `--request-read-timeout`.
    pub fn from_config(config: &crate::GatewayConfig) -> Self {
        IntakeLimits {
            max_body_bytes: MAX_BODY_BYTES,
            max_bytes_in_flight: config
                .max_decoding_requests
                .saturating_mul(config.limits.max_message_bytes),
            interactive_reserved_bytes: config
                .interactive_reserved_decoding()
                .saturating_mul(config.limits.max_message_bytes),
            read_timeout: config.request_read_timeout,
        }
    }
}

impl Default for IntakeLimits {
    fn default() -> Self {
        IntakeLimits {
            max_body_bytes: MAX_BODY_BYTES,
            max_bytes_in_flight: 64 * (4 << 20),
            interactive_reserved_bytes: 8 * (4 << 20),
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// The checks run on a completion request's head and body before its handler parses it.
#[derive(Clone)]
pub struct Intake {
    keys: Option<Arc<ApiKeys>>,
    /// Bytes any request may take.
    budget: Arc<Semaphore>,
    /// Bytes taken once `budget` is spent; kept by INTERACTIVE requests only.
    reserve: Arc<Semaphore>,
    limits: IntakeLimits,
    metrics: Arc<GatewayMetrics>,
}

/// Marks a request whose body was read under the INTERACTIVE reserve of the byte budget: its
/// handler refuses it once parsed unless it is INTERACTIVE ([`batch_over_its_share`]).
#[derive(Clone, Copy, Debug)]
pub struct InteractiveReserve;

/// The 429 for a parsed BATCH request that was read under the INTERACTIVE reserve.
pub fn batch_over_its_share() -> ApiError {
    ApiError::from(crate::admission::exhausted(
        "gateway is reading as many request bytes as BATCH requests may at once \
         (--interactive-reserved-decoding keeps the rest for INTERACTIVE)",
    ))
}

/// The bytes a request's body holds of the budget; released when dropped (after parsing).
#[derive(Clone)]
pub struct BodyPermit(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

impl Intake {
    pub fn new(limits: IntakeLimits, keys: Option<Arc<ApiKeys>>) -> Self {
        // A budget below one largest body would refuse such a body for ever.
        let budget = limits
            .max_bytes_in_flight
            .max(limits.max_body_bytes)
            .min(Semaphore::MAX_PERMITS);
        let reserve = limits
            .interactive_reserved_bytes
            .min(budget.saturating_sub(limits.max_body_bytes));
        Intake {
            keys,
            budget: Arc::new(Semaphore::new(budget - reserve)),
            reserve: Arc::new(Semaphore::new(reserve)),
            limits,
            metrics: Arc::new(GatewayMetrics::unregistered()),
        }
    }

    /// Counts refusals in `metrics` (the gateway's, registered) instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<GatewayMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Checks the head, reserves the body's bytes and reads the body within the read timeout;
    /// the request comes back with its body in memory and a [`BodyPermit`] in its extensions.
    pub async fn admit(&self, req: Request) -> Result<Request, ApiError> {
        if let Some(keys) = &self.keys {
            let key = bearer(
                req.headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
            );
            keys.authenticate(key)
                .map_err(|e| ApiError::from(Status::from(e)))?;
        }
        let max = self.limits.max_body_bytes;
        let reserve = match content_length(req.headers())? {
            Some(n) if n > max => return Err(too_large(max)),
            Some(n) => n,
            None => max,
        };
        let permits = u32::try_from(reserve).map_err(|_| too_large(max))?;
        let declared_batch = req
            .headers()
            .get(super::LATENCY_CLASS_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("batch"));
        let spent = || {
            self.metrics
                .decoding_refused("http", DecodingRefusal::Limit);
            ApiError::from(crate::admission::exhausted(
                "gateway is reading as many request bytes as it may at once",
            ))
        };
        let (permit, reserved) = match self.budget.clone().try_acquire_many_owned(permits) {
            Ok(p) => (p, false),
            Err(_) if declared_batch => {
                self.metrics
                    .decoding_refused("http", DecodingRefusal::BatchShare);
                return Err(batch_over_its_share());
            }
            Err(_) => {
                let p = self
                    .reserve
                    .clone()
                    .try_acquire_many_owned(permits)
                    .map_err(|_| spent())?;
                (p, true)
            }
        };
        let (parts, body) = req.into_parts();
        let read_timeout = self.limits.read_timeout;
        let bytes = tokio::time::timeout(read_timeout, read_body(body, reserve))
            .await
            .map_err(|_| {
                self.metrics
                    .decoding_refused("http", DecodingRefusal::ReadTimeout);
                ApiError {
                    status: StatusCode::REQUEST_TIMEOUT,
                    kind: "invalid_request_error",
                    message: format!("the request body did not arrive within {read_timeout:?}"),
                    param: None,
                    code: Some("request_timeout"),
                    retry_after: None,
                }
            })??;
        let mut req = Request::from_parts(parts, Body::from(bytes));
        req.extensions_mut().insert(BodyPermit(Arc::new(permit)));
        if reserved {
            req.extensions_mut().insert(InteractiveReserve);
        }
        Ok(req)
    }
}

/// The middleware over the completion routes.
pub async fn guard(State(intake): State<Intake>, req: Request, next: Next) -> Response {
    match intake.admit(req).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn content_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(v) = headers.get(header::CONTENT_LENGTH) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|n| Some(usize::try_from(n).unwrap_or(usize::MAX)))
        .ok_or_else(|| ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: "Content-Length is not a number".into(),
            param: None,
            code: None,
            retry_after: None,
        })
}

fn too_large(max: usize) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        kind: "invalid_request_error",
        message: format!("the request body is larger than {max} bytes"),
        param: None,
        code: Some("request_too_large"),
        retry_after: None,
    }
}

/// The whole body, refusing it once it grows beyond `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("reading the request body: {e}"),
            param: None,
            code: None,
            retry_after: None,
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}
