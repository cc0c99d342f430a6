//! The worker's `moe.v1.Inference` service: validates requests, hands them to the engine and
//! streams its events back. Proto types stop here; the engine sees domain types only.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use futures::Stream;
use moe_common::LatencyClass;
use moe_common::pb::v1::inference_server::Inference;
use moe_common::pb::{FinishReason, GenerateRequest, GenerateResponse, Timings, Usage};
use moe_common::request::{RequestLimits, parse_grpc_timeout, validate};
use tokio::sync::Notify;
use tonic::{Code, Request, Response, Status};
use tracing::{Instrument, Span};

use crate::engine::{
    EngineError, EngineHandle, Event, EventReceiver, EventSender, Finish, Job, PreparedPrompt,
    Prompt, Sampling, Summary, job_channel,
};
use crate::metrics::{WorkerMetrics, class_label};

/// Tracks streams in flight so a draining worker can wait for them.
#[derive(Default)]
pub struct Intake {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Intake {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until no stream is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Decrements the in-flight count when a response stream is dropped (finished or abandoned).
struct InFlight(Arc<Intake>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

pub struct InferenceService {
    engine: EngineHandle,
    worker_id: String,
    limits: RequestLimits,
    intake: Arc<Intake>,
    metrics: Arc<WorkerMetrics>,
}

impl InferenceService {
    pub fn new(engine: EngineHandle, worker_id: String, intake: Arc<Intake>) -> Self {
        InferenceService {
            engine,
            worker_id,
            limits: RequestLimits::default(),
            intake,
            metrics: Arc::new(WorkerMetrics::unregistered()),
        }
    }

    /// Checks requests against these limits instead of the defaults.
    pub fn with_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Records into `metrics` (registered in the process's registry) instead of nowhere.
    pub fn with_metrics(mut self, metrics: Arc<WorkerMetrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

pub fn status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument(m) => Status::invalid_argument(m),
        EngineError::ResourceExhausted(m) => Status::resource_exhausted(m),
        EngineError::TooLong(m) => Status::out_of_range(m),
        EngineError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        EngineError::Unavailable(m) => Status::unavailable(m),
        e @ (EngineError::Internal(_) | EngineError::Load(_)) => Status::internal(e.to_string()),
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The request's span on this worker, a child of the caller's (gateway attempt) span; it
        // stays open until the response stream ends.
        let span = tracing::info_span!(
            "worker.request",
            otel.kind = "server",
            class = tracing::field::Empty,
            max_tokens = request.get_ref().max_tokens,
            completion_tokens = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        moe_common::telemetry::propagation::adopt_remote_parent(&span, request.metadata());
        let result = self
            .start(request, span.clone())
            .instrument(span.clone())
            .await;
        if let Err(status) = &result {
            span.record("otel.status_code", "ERROR");
            self.metrics.request_finished(status.code());
        }
        result
    }
}

impl InferenceService {
    async fn start(
        &self,
        request: Request<GenerateRequest>,
        span: Span,
    ) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        if self.intake.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("worker is draining"));
        }
        let deadline = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|d| arrived + d);
        let req = request.into_inner();
        // Refused before the prompt is rendered and tokenised: the answer does not depend on it.
        let model = self.engine.model();
        if req.batch_invariant && !model.batch_invariant {
            return Err(not_batch_invariant(model));
        }
        let (prompt, reply) = prepare_request(&self.engine, &self.limits, &req).await?;
        // Bounded by what the job can send, so the engine never waits on this stream's reader
        // (`engine::events`, review H6).
        let (events, rx) = job_channel(req.max_tokens);
        if let Some(mut reply) = reply {
            // After a migration the reply parser resumes where the previous worker's stood.
            let tokenizer = self.engine.tokenizer();
            reply.resumed = crate::chat::resumed_text(&reply, &req.resume_token_ids, |t, s| {
                tokenizer.token_to_bytes(t, s)
            });
            let _ = events.send(Event::Chat(reply));
        }
        let mut job = job(&req, prompt, arrived, deadline, events);
        let class = job.class;
        span.record("class", class_label(class));
        job.span = span.clone();
        self.intake.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.intake.clone());
        self.engine.submit(job).await.map_err(status)?;
        let record = Record {
            metrics: self.metrics.clone(),
            class,
            span,
            outcome: None,
            last_token: None,
        };
        let meta = FinalMeta {
            worker_id: self.worker_id.clone(),
            profile: model.profile.to_string(),
            request_id: req.request_id.clone(),
            batch_invariant: model.batch_invariant,
            system_fingerprint: model.system_fingerprint.clone(),
        };
        Ok(Response::new(Box::pin(responses(rx, meta, guard, record))))
    }
}

/// One request's metrics and span, recorded when its response stream ends (or is dropped: the
/// client went away).
struct Record {
    metrics: Arc<WorkerMetrics>,
    class: LatencyClass,
    span: Span,
    outcome: Option<Code>,
    last_token: Option<Instant>,
}

impl Record {
    fn delta(&mut self, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        let gap = self.last_token.map(|t| now.duration_since(t));
        self.metrics.tokens(self.class, tokens, gap);
        self.last_token = Some(now);
    }

    fn done(&mut self, s: &Summary) {
        if s.completion_tokens > 0 {
            self.metrics
                .first_token(self.class, s.time_to_first_token, s.queue, s.prompt_tokens);
        }
        self.span.record("completion_tokens", s.completion_tokens);
        self.end(match s.finish {
            Finish::Stop | Finish::Length => Code::Ok,
            Finish::Cancelled => Code::Cancelled,
        });
    }

    /// Sets the outcome counted when the record drops.
    fn end(&mut self, code: Code) {
        self.outcome = Some(code);
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let code = self.outcome.unwrap_or(Code::Cancelled);
        if !matches!(code, Code::Ok | Code::Cancelled) {
            self.span.record("otel.status_code", "ERROR");
        }
        self.metrics.request_finished(code);
    }
}

struct FinalMeta {
    worker_id: String,
    profile: String,
    request_id: String,
    batch_invariant: bool,
    system_fingerprint: String,
}

/// The refusal of a request with `batch_invariant` set by a worker that is not batch-invariant:
/// FAILED_PRECONDITION, never a silent fallback. The message starts with the field's name (the
/// gateway's HTTP API reports it as the error's `param`).
fn not_batch_invariant(model: &crate::engine::LoadedModel) -> Status {
    Status::failed_precondition(format!(
        "batch_invariant: this worker does not guarantee batch-invariant output (decode mode {}): \
         its sequences share one KV cache (--kv-unified), or it batches decode steps with layers \
         on an accelerator (--decode-mode batched); send the request to a batch-invariant worker \
         (advert batch_invariant: true) or through a gateway",
        model.decode_mode.as_str()
    ))
}

/// The request's prompt: raw text, or a chat to render with the model's template.
/// Generate's checks and prompt preparation, shared with `Worker/Tokenize` so that a request
/// Tokenize accepts, Generate accepts with the same tokens: validation, the model name, then
/// templating and tokenizing on the blocking pool (never on the engine thread).
pub(crate) async fn prepare_request(
    engine: &EngineHandle,
    limits: &RequestLimits,
    req: &GenerateRequest,
) -> Result<(PreparedPrompt, Option<crate::chat::ChatReply>), Status> {
    validate(req, limits, true).map_err(|e| Status::invalid_argument(e.0))?;
    let model = engine.model();
    if !req.model.is_empty() && req.model != model.info.name {
        return Err(Status::not_found(format!(
            "model {:?} is not served here (this worker serves {:?})",
            req.model, model.info.name
        )));
    }
    let prompt = request_prompt(req).map_err(Status::invalid_argument)?;
    let tokenizer = engine.tokenizer().clone();
    tokio::task::spawn_blocking(move || tokenizer.prepare(&prompt))
        .await
        .map_err(|e| Status::internal(format!("preparing the prompt: {e}")))?
        .map_err(status)
}

pub(crate) fn request_prompt(req: &GenerateRequest) -> Result<Prompt, String> {
    Ok(if req.messages.is_empty() {
        Prompt::Text(req.prompt.clone())
    } else {
        Prompt::Chat(Box::new(crate::chat::chat_job(req)?))
    })
}

fn job(
    req: &GenerateRequest,
    prompt: PreparedPrompt,
    arrived: Instant,
    deadline: Option<Instant>,
    events: EventSender,
) -> Job {
    let sampling = req
        .sampling
        .as_ref()
        .map(|s| Sampling {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repeat_penalty: s.repeat_penalty,
            seed: s.seed,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            logprobs: None,
        })
        .unwrap_or_default();
    let sampling = Sampling {
        logprobs: req.logprobs.then_some(req.top_logprobs),
        ..sampling
    };
    // Validated before: an unknown value cannot reach here.
    let class = LatencyClass::try_from(req.latency_class).unwrap_or_default();
    Job {
        prompt,
        resume_tokens: req.resume_token_ids.clone(),
        max_tokens: req.max_tokens,
        sampling,
        stop: req.stop.clone(),
        class,
        deadline,
        arrived,
        events,
        span: Span::none(),
    }
}

fn responses(
    mut rx: EventReceiver,
    meta: FinalMeta,
    guard: InFlight,
    mut record: Record,
) -> impl Stream<Item = Result<GenerateResponse, Status>> + Send {
    async_stream::stream! {
        let _guard = guard;
        // Chat replies are parsed here, off the engine thread (reasoning, tool calls).
        let mut shaper = crate::chat::ReplyShaper::new(&meta.request_id);
        while let Some(event) = rx.recv().await {
            match event {
                Event::Chat(reply) => {
                    let m = shaper.start(reply);
                    if !m.text.is_empty() || !m.tool_calls.is_empty() || !m.reasoning.is_empty() {
                        yield Ok(m);
                    }
                }
                Event::Delta { text, token_ids, logprobs } => {
                    record.delta(token_ids.len());
                    let mut m = shaper.delta(text, token_ids);
                    m.logprobs = crate::chat::logprobs_pb(logprobs);
                    yield Ok(m);
                }
                Event::Done(summary) => {
                    record.done(&summary);
                    if let Some(m) = shaper.finish() {
                        yield Ok(m);
                    }
                    let mut last = final_message(&summary, &meta);
                    last.finish_reason = shaper.finish_reason(last.finish_reason()) as i32;
                    yield Ok(last);
                    return;
                }
                Event::Failed(e) => {
                    let status = status(e);
                    record.end(status.code());
                    yield Err(status);
                    return;
                }
            }
        }
        if rx.overflowed() {
            record.end(Code::Internal);
            yield Err(overflow_status(rx.capacity()));
            return;
        }
        record.end(Code::Unavailable);
        yield Err(Status::unavailable("engine stopped before the request finished"));
    }
}

/// The end of a stream whose job overflowed its event channel (see `engine::events`).
fn overflow_status(capacity: usize) -> Status {
    Status::internal(format!(
        "the request's event channel ({capacity} events) was full; the engine stopped the \
         request instead of waiting"
    ))
}

fn final_message(s: &Summary, meta: &FinalMeta) -> GenerateResponse {
    let finish_reason = match s.finish {
        Finish::Stop => FinishReason::Stop,
        Finish::Length => FinishReason::Length,
        Finish::Cancelled => FinishReason::Cancelled,
    };
    GenerateResponse {
        finish_reason: finish_reason as i32,
        usage: Some(Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            cached_prompt_tokens: s.cached_prompt_tokens,
        }),
        worker_id: meta.worker_id.clone(),
        offload_profile: meta.profile.clone(),
        timings: Some(Timings {
            queue_seconds: s.queue.as_secs_f64(),
            time_to_first_token_seconds: s.time_to_first_token.as_secs_f64(),
            decode_tokens_per_second: s.decode_tokens_per_second,
        }),
        request_id: meta.request_id.clone(),
        batch_invariant: meta.batch_invariant,
        system_fingerprint: meta.system_fingerprint.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;

    use super::*;
    use crate::engine::events::{EventSendError, job_capacity};

    fn delta(id: u32) -> Event {
        Event::Delta {
            text: format!("t{id}"),
            token_ids: vec![id],
            logprobs: Vec::new(),
        }
    }

    fn done(completion_tokens: u32) -> Event {
        Event::Done(Summary {
            finish: Finish::Length,
            prompt_tokens: 1,
            completion_tokens,
            cached_prompt_tokens: 0,
            queue: Duration::ZERO,
            time_to_first_token: Duration::ZERO,
            decode_tokens_per_second: 0.0,
        })
    }

    fn stream(rx: EventReceiver) -> GenerateStream {
        let meta = FinalMeta {
            worker_id: "w".into(),
            profile: "full".into(),
            request_id: "r".into(),
            batch_invariant: true,
            system_fingerprint: "fp_0123456789abcdef".into(),
        };
        let intake = Arc::new(Intake::default());
        intake.in_flight.fetch_add(1, Ordering::SeqCst);
        let record = Record {
            metrics: Arc::new(WorkerMetrics::unregistered()),
            class: LatencyClass::Interactive,
            span: Span::none(),
            outcome: None,
            last_token: None,
        };
        Box::pin(responses(rx, meta, InFlight(intake), record))
    }

    /// The engine sends without waiting: a job whose reader reads nothing until the end can
    /// still queue every event it may send (a token each, the flush, the end), and the reader
    /// then gets them all.
    #[tokio::test]
    async fn every_event_a_job_can_send_fits_while_nobody_reads() {
        let max_tokens = 40;
        let (tx, rx) = job_channel(max_tokens);
        assert_eq!(rx.capacity(), job_capacity(max_tokens));
        // One token each, a flush of held text, and two for the Chat event's place.
        for id in 0..max_tokens + 2 {
            tx.send(delta(id)).expect("queued without a reader");
        }
        tx.send(done(max_tokens)).expect("the end fits too");
        assert!(!tx.is_closed());
        drop(tx);
        let got: Vec<_> = stream(rx).collect().await;
        assert_eq!(got.len(), max_tokens as usize + 3);
        let last = got.last().unwrap().as_ref().expect("a final message");
        assert_eq!(last.finish_reason(), FinishReason::Length);
        assert!(got.iter().all(Result::is_ok));
    }

    /// A send that finds the channel full does not wait: the job counts as gone (the engine
    /// frees its slot) and its stream ends with INTERNAL naming the cause.
    #[tokio::test]
    async fn a_full_channel_fails_the_job_instead_of_blocking_the_engine() {
        let (tx, rx) = job_channel(2);
        for id in 0..job_capacity(2) as u32 {
            tx.send(delta(id)).unwrap();
        }
        let started = std::time::Instant::now();
        assert!(matches!(
            tx.send(delta(99)),
            Err(EventSendError::Overflow(_))
        ));
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(tx.is_closed(), "the engine must drop an overflowed job");
        drop(tx);
        let got: Vec<_> = stream(rx).collect().await;
        assert_eq!(got.len(), job_capacity(2) + 1);
        let end = got.last().unwrap().as_ref().unwrap_err();
        assert_eq!(end.code(), Code::Internal);
        assert!(end.message().contains("event channel"), "{}", end.message());
    }
}
