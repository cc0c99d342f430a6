//! The gateway's `moe.v1.Inference` service: authenticate, validate, place the first attempt,
//! then hand the request to its drive loop ([`drive`]), which proxies the worker's stream,
//! retries on another worker before the first token and migrates mid-stream after it.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use moe_common::LatencyClass;
use moe_common::pb::v1::inference_server::Inference;
use moe_common::pb::{GenerateRequest, GenerateResponse};
use moe_common::request::{RequestLimits, parse_grpc_timeout, validate};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span};

use crate::admission::{
    StreamLimit, default_interactive_reserve, exhausted, exhausted_after, retry_hint,
    with_retry_hint,
};
use crate::auth::ApiKeys;
use crate::metrics::GatewayMetrics;
use crate::router::RoutingState;
use crate::scheduler::{Demand, PrefixHits, ScheduleError, estimate_prompt_tokens};
use crate::tokenize::{PromptSizing, Sized};

mod drive;
use drive::Drive;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Streams proxied at once; more are refused with RESOURCE_EXHAUSTED (load shedding). An
    /// eighth of them (see [`GatewayService::with_interactive_reserve`]) only INTERACTIVE
    /// requests may take.
    pub max_streams: usize,
    /// Deadline for requests that bring none (and the cap for those that do).
    pub request_timeout: Duration,
    /// Workers tried per request at most (first placement, retries and migrations).
    pub max_attempts: u32,
    /// Longest a relayed stream may wait for its worker's next message (then the worker counts
    /// as failed and the stream moves on) or for its client to take one (then it ends).
    pub stream_idle_timeout: Duration,
    /// Longest an attempt may wait for its worker's first message (queueing and prefill of
    /// prompt and replayed tokens come before it); then the worker counts as failed.
    pub first_message_timeout: Duration,
    pub limits: RequestLimits,
}

/// Cheap to clone: every front end (gRPC, HTTP) holds one.
#[derive(Clone)]
pub struct GatewayService {
    router: Arc<RoutingState>,
    streams: StreamLimit,
    config: ProxyConfig,
    metrics: Arc<GatewayMetrics>,
    /// API keys every request must present; None serves anyone.
    auth: Option<Arc<ApiKeys>>,
    /// Tokenize-before-placement and prefix hits (off unless set: the bytes/3 estimate).
    sizing: Arc<PromptSizing>,
}

impl GatewayService {
    pub fn new(router: Arc<RoutingState>, config: ProxyConfig) -> Self {
        GatewayService {
            router,
            streams: StreamLimit::new(
                config.max_streams,
                default_interactive_reserve(config.max_streams),
            ),
            config,
            metrics: Arc::new(GatewayMetrics::unregistered()),
            auth: None,
            sizing: Arc::default(),
        }
    }

    /// Sizes prompts with a worker's tokenizer and ranks with the workers' prefix caches
    /// (`--tokenize-timeout`, `--prefix-routing`) in [`Self::start_sized`].
    pub fn with_prompt_sizing(mut self, sizing: PromptSizing) -> Self {
        self.sizing = Arc::new(sizing);
        self
    }

    /// Keeps `reserved` of the `max_streams` places for INTERACTIVE requests (default: an
    /// eighth, at least one): BATCH streams cannot fill the gateway (review M6).
    pub fn with_interactive_reserve(mut self, reserved: usize) -> Self {
        self.streams = StreamLimit::new(self.config.max_streams, reserved);
        self
    }

    /// Requires one of these API keys on every request (see `auth`).
    pub fn with_api_keys(mut self, keys: Option<Arc<ApiKeys>>) -> Self {
        self.auth = keys;
        self
    }

    /// Records into `metrics` (registered in the process's registry) instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<GatewayMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where this service records (the front ends count their refusals there too).
    pub fn metrics(&self) -> &Arc<GatewayMetrics> {
        &self.metrics
    }
}

pub fn schedule_status(e: ScheduleError) -> Status {
    match e {
        ScheduleError::ModelNotFound(_) => Status::not_found(e.to_string()),
        ScheduleError::Unavailable(_) => Status::unavailable(e.to_string()),
        ScheduleError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
        ScheduleError::NoHeadroom { .. } => exhausted(e),
        ScheduleError::PromptTooLong { .. } => Status::out_of_range(e.to_string()),
        ScheduleError::NotBatchInvariant { .. } => Status::failed_precondition(e.to_string()),
    }
}

/// The placement may have to wait for a sequence slot: no worker had KV headroom (queued), or
/// the chosen worker advertised every slot taken. Only then is the expected wait worth its
/// full scan of the workers.
fn may_wait(r: &crate::scheduler::Ranking) -> bool {
    r.queued
        || r.candidates.first().is_some_and(|c| {
            let w = &c.worker;
            w.load.active + w.load.queued >= w.capacity.max_sequences
        })
}

fn class_of(req: &GenerateRequest) -> LatencyClass {
    LatencyClass::try_from(req.latency_class).unwrap_or_default()
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

impl GatewayService {
    /// Validates and places a request, then proxies it in the background; the returned stream
    /// yields the worker's messages (across retries and migrations) and ends with the final
    /// message or an error status. Every front end (gRPC, HTTP) goes through here.
    ///
    /// The request's span (`gateway.request`) is a child of the current span, so a front end
    /// that extracted a caller's trace context enters a span carrying it before calling this.
    ///
    /// `api_key` is the caller's bearer key, checked first when the gateway has API keys.
    pub fn start(
        &self,
        req: GenerateRequest,
        client_timeout: Option<Duration>,
        api_key: Option<&str>,
    ) -> Result<ReceiverStream<Result<GenerateResponse, Status>>, Status> {
        self.start_with(req, client_timeout, api_key, None, None)
    }

    /// What the gRPC and HTTP front ends call, once the request's body is decoded and its
    /// place under the decoding limit given back: [`Self::start`], after sizing the prompt with
    /// a worker's tokenizer and finding the workers' prefix hits ([`PromptSizing`], bounded by
    /// `--tokenize-timeout`). The request takes its place under `--max-concurrency` before it
    /// is sized, so the requests being sized are bounded too (by that limit, with its
    /// INTERACTIVE share); one that finds no place, or that fails authentication or validation,
    /// is not sent to a worker to tokenize: `start` refuses it as before.
    pub async fn start_sized(
        &self,
        req: GenerateRequest,
        client_timeout: Option<Duration>,
        api_key: Option<&str>,
    ) -> Result<ReceiverStream<Result<GenerateResponse, Status>>, Status> {
        let admissible = self
            .auth
            .as_ref()
            .is_none_or(|keys| keys.authenticate(api_key).is_ok())
            && validate(&req, &self.config.limits, false).is_ok();
        let place = admissible
            .then(|| self.streams.try_acquire(class_of(&req)).ok())
            .flatten();
        let sized = if place.is_some() {
            let span = tracing::info_span!("gateway.tokenize");
            Some(self.sizing.size(&self.router, &req).instrument(span).await)
        } else {
            None
        };
        self.start_with(req, client_timeout, api_key, sized, place)
    }

    /// `place`: the request's place under `--max-concurrency` when it already took one.
    fn start_with(
        &self,
        req: GenerateRequest,
        client_timeout: Option<Duration>,
        api_key: Option<&str>,
        sized: Option<Sized>,
        place: Option<OwnedSemaphorePermit>,
    ) -> Result<ReceiverStream<Result<GenerateResponse, Status>>, Status> {
        let class = class_of(&req);
        let span = tracing::info_span!(
            "gateway.request",
            class = class.as_str(),
            max_tokens = req.max_tokens,
            otel.status_code = tracing::field::Empty,
        );
        let result = span
            .in_scope(|| self.start_in(req, client_timeout, api_key, sized, place, span.clone()));
        if let Err(status) = &result {
            span.record("otel.status_code", "ERROR");
            self.metrics.request_finished("none", class, status.code());
        }
        result
    }

    fn start_in(
        &self,
        req: GenerateRequest,
        client_timeout: Option<Duration>,
        api_key: Option<&str>,
        sized: Option<Sized>,
        place: Option<OwnedSemaphorePermit>,
        span: Span,
    ) -> Result<ReceiverStream<Result<GenerateResponse, Status>>, Status> {
        let started = Instant::now();
        let grant = match &self.auth {
            Some(keys) => Some(
                keys.admit(api_key, &req)
                    .map_err(|e| with_retry_hint(e.into()))?,
            ),
            None => None,
        };
        let timeout = client_timeout.map_or(self.config.request_timeout, |t| {
            t.min(self.config.request_timeout)
        });
        validate(&req, &self.config.limits, false).map_err(|e| Status::invalid_argument(e.0))?;
        let class = class_of(&req);
        let (prompt_tokens, hits, prompt_tokens_exact) = match sized {
            Some(s) => {
                self.metrics.prompt_sized(s.source);
                (s.prompt_tokens, s.hits, s.source == "tokenizer")
            }
            None => (estimate_prompt_tokens(&req), PrefixHits::default(), false),
        };
        let demand = Demand {
            model: &req.model,
            class,
            prompt_tokens,
            max_tokens: req.max_tokens,
            needs: moe_common::registry::Features::needed_by(&req),
            batch_invariant: req.batch_invariant,
        };
        // Refusals say when to come back: after the wait the admission queues predict.
        let hint = || retry_hint(self.router.expected_wait(&demand));
        let permit = match place {
            Some(p) => p,
            None => self.streams.try_acquire_or(class, hint)?,
        };
        self.router.request_started();
        // The first placement happens before the stream starts, so NOT_FOUND / UNAVAILABLE /
        // OUT_OF_RANGE / FAILED_PRECONDITION are the call's status. A request no worker has headroom for now is
        // placed where it should wait least (`scheduler::queue`), not refused.
        let ranking = tracing::info_span!("gateway.schedule", attempt = 0)
            .in_scope(|| self.router.rank_with_hits(&demand, &hits, &HashSet::new()))
            .map_err(|e| {
                self.metrics.placement_failed(class, &e);
                match e {
                    ScheduleError::NoHeadroom { .. } => exhausted_after(e, hint()),
                    e => schedule_status(e),
                }
            })?;
        if ranking.candidates.is_empty() {
            // Only the other pool has room, this class may not spill there now, and no worker
            // of its own pool could queue it.
            return Err(exhausted_after(
                format!(
                    "no worker of the preferred pool can take or queue the request and \
                     spill-over is not allowed for this class now ({} worker(s) of the other \
                     pool could take it)",
                    ranking.fallback.len()
                ),
                hint(),
            ));
        }
        // A request that must wait for a slot and whose deadline would pass before it could
        // start is refused now, with the wait as its retry hint, instead of timing out queued.
        if may_wait(&ranking)
            && let Some(wait) = self.router.expected_wait(&demand)
            && wait >= timeout.saturating_sub(started.elapsed())
        {
            return Err(exhausted_after(
                format!(
                    "the request's deadline ({:.1} s) would pass before a worker could start \
                     it: the admission queues predict a wait of {:.1} s",
                    timeout.as_secs_f64(),
                    wait.as_secs_f64()
                ),
                retry_hint(Some(wait)),
            ));
        }
        let (tx, rx) = mpsc::channel(64);
        let drive = Drive {
            router: self.router.clone(),
            max_attempts: self.config.max_attempts,
            deadline: started + timeout,
            idle_timeout: self.config.stream_idle_timeout,
            first_message_timeout: self.config.first_message_timeout,
            started,
            class,
            prompt_tokens,
            prompt_tokens_exact,
            hits: Arc::new(hits),
            req,
            tx,
            metrics: self.metrics.clone(),
            _in_flight: self.metrics.in_flight(),
            _permit: permit,
            grant,
        };
        tokio::spawn(drive.run(ranking).instrument(span));
        Ok(ReceiverStream::new(rx))
    }

    /// Names of the models ready workers serve now.
    pub fn models(&self) -> Vec<String> {
        let snapshot = self.router.snapshot();
        let mut names: Vec<String> = snapshot
            .workers
            .values()
            .filter(|w| w.is_ready())
            .map(|w| w.model.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

#[tonic::async_trait]
impl Inference for GatewayService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let server = tracing::info_span!("gateway.grpc", otel.kind = "server");
        moe_common::telemetry::propagation::adopt_remote_parent(&server, request.metadata());
        // The body is decoded: its place under the decoding limit goes back now, not after
        // sizing (a worker's Tokenize) and placement, which `start_sized` does under
        // --max-concurrency instead.
        if let Some(place) = request.extensions().get::<crate::grpc::DecodePlace>() {
            place.release();
        }
        // Read under the INTERACTIVE share of the decoding limit: only INTERACTIVE may keep it.
        if request
            .extensions()
            .get::<crate::grpc::InteractiveReserve>()
            .is_some()
            && class_of(request.get_ref()) != LatencyClass::Interactive
        {
            self.metrics
                .decoding_refused("grpc", crate::metrics::DecodingRefusal::BatchShare);
            return Err(crate::grpc::batch_over_its_decoding_share());
        }
        let api_key = crate::auth::grpc_bearer(request.metadata()).map(str::to_owned);
        let stream = self
            .start_sized(request.into_inner(), timeout, api_key.as_deref())
            .instrument(server)
            .await?;
        Ok(Response::new(Box::pin(stream)))
    }
}
