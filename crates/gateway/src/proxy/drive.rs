//! One request's drive loop: place on a worker, relay its stream to the client, retry on
//! another worker before the first token and migrate mid-stream after it, within the request's
//! deadline, attempt limit and the gateway's retry budget.
//!
//! A migration replays the token ids the client received as `resume_token_ids`. Workers send
//! ids only together with their text, so the replay ends on a clean boundary (no split
//! character, no partial stop string) and the new worker regenerates anything held back. It
//! goes only to a worker of the same model file as the one that produced the first token
//! (`continuity`).
//!
//! While relaying, the request's deadline and the stream idle timeout are enforced on every
//! wait: a worker that sends nothing for the idle timeout (the first-message timeout before its
//! first message, which may follow queueing and a long prefill) is treated as failed (retried or
//! migrated), a client that reads nothing for that long is let go, and the deadline ends the
//! stream with DEADLINE_EXCEEDED. One slot of the client's channel is kept for the terminal
//! status, so it is queued even behind a client that stopped reading.

mod continuity;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_common::LatencyClass;
use moe_common::pb::v1::inference_client::InferenceClient;
use moe_common::pb::{FinishReason, GenerateRequest, GenerateResponse, Usage};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::{sleep, sleep_until, timeout_at};
use tonic::{Code, Request, Status};
use tracing::{Instrument, Span};

use self::continuity::Continuity;
use super::class_of;
use crate::auth::Grant;
use crate::metrics::{GatewayMetrics, InFlightGuard, StreamLabels};
use crate::router::RoutingState;
use crate::scheduler::{Candidate, Demand, PrefixHits, Ranking, pick};

/// One request's journey over one or more workers.
pub(super) struct Drive {
    pub(super) router: Arc<RoutingState>,
    pub(super) max_attempts: u32,
    pub(super) deadline: Instant,
    /// Longest wait for the worker's next message, or for the client to take one.
    pub(super) idle_timeout: Duration,
    /// Longest wait for a worker's first message of an attempt (queueing and prefill).
    pub(super) first_message_timeout: Duration,
    pub(super) started: Instant,
    pub(super) class: LatencyClass,
    /// The prompt's tokens (a worker's tokenizer, or the bytes/3 estimate).
    pub(super) prompt_tokens: u32,
    /// Whether `prompt_tokens` is a worker tokenizer's count (not the estimate): only then does
    /// a final message the gateway writes itself report it.
    pub(super) prompt_tokens_exact: bool,
    /// Prompt tokens each worker holds (prefix-aware routing; empty when off).
    pub(super) hits: Arc<PrefixHits>,
    pub(super) req: GenerateRequest,
    pub(super) tx: mpsc::Sender<Result<GenerateResponse, Status>>,
    pub(super) metrics: Arc<GatewayMetrics>,
    pub(super) _in_flight: InFlightGuard,
    pub(super) _permit: OwnedSemaphorePermit,
    /// The API key's stream slot and token charge, settled when the request ends.
    pub(super) grant: Option<Grant>,
}

enum Outcome {
    /// The final message reached the client.
    Done,
    /// The client left; dropping the worker stream cancels the sequence there.
    ClientGone,
    /// The client read nothing for the idle timeout (a half-open connection, a stuck reader).
    ClientStalled,
    /// The worker failed; `retryable` says whether another worker may take over.
    Failed { status: Status, retryable: bool },
    /// The worker is draining and gave the stream back: continue elsewhere, on the drain
    /// budget rather than the retry budget.
    Drained,
}

/// How a request ended: `Ok(code)` when nothing more goes to the client, `Err(status)` when
/// this terminal status must still reach it.
type End = Result<Code, Status>;

fn deadline_passed() -> Status {
    Status::deadline_exceeded("request deadline passed")
}

/// Per-attempt stream bookkeeping for latency metrics.
struct Relay {
    labels: StreamLabels,
    /// When the previous tokens went to the client (None before the first token).
    last_token: Option<Instant>,
}

/// Statuses after which another worker may succeed.
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::Cancelled
    )
}

impl Drive {
    pub(super) async fn run(self, first: Ranking) {
        let mut model = String::from("none");
        // The channel is empty now, so this slot is free at once; it is used only for the
        // terminal status.
        let code = match self.tx.clone().reserve_owned().await {
            Err(_) => Code::Cancelled,
            Ok(terminal) => match self.drive(first, &mut model).await {
                Ok(code) => code,
                Err(status) => {
                    let code = status.code();
                    terminal.send(Err(status));
                    code
                }
            },
        };
        self.metrics.request_finished(&model, self.class, code);
        if !matches!(code, Code::Ok | Code::Cancelled) {
            Span::current().record("otel.status_code", "ERROR");
        }
    }

    /// Tries workers until one finishes the stream; returns the request's outcome and leaves
    /// the model of the last worker tried in `model`.
    async fn drive(&self, first: Ranking, model: &mut String) -> End {
        let mut generated: Vec<u32> = Vec::new();
        let mut tried = HashSet::new();
        let mut ranking = Some(first);
        let mut migrations = 0u32;
        let mut last: Option<Status> = None;
        // The last attempt ended because its worker drained (M4: a separate budget).
        let mut drained = false;
        let mut continuity = Continuity::new(self.req.batch_invariant);
        // Whether every worker that produced some of the client's tokens before the current
        // attempt advertised `batch_invariant: true`; the final message says so only then.
        let mut invariant_so_far = true;
        // The advertised `system_fingerprint` of the worker that produced the client's latest
        // tokens (empty: none yet, or a worker older than the field); a final message the
        // gateway writes itself carries it.
        let mut producer_fingerprint = String::new();
        for attempt in 0..self.max_attempts {
            let r = match ranking.take() {
                Some(r) => Ok(r),
                None => tracing::info_span!("gateway.schedule", attempt).in_scope(|| {
                    self.router
                        .rank_with_hits(&self.demand(generated.len()), &self.hits, &tried)
                }),
            };
            let candidate = match r {
                Ok(mut r) => {
                    continuity.filter(&mut r);
                    pick(r, attempt > 0)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "no further worker to try");
                    self.metrics.placement_failed(self.class, &e);
                    None
                }
            };
            let Some((candidate, decision)) = candidate else {
                break;
            };
            let budgeted = match (attempt, drained) {
                (0, _) => true,
                (_, true) => self.router.take_drain_migration(),
                (_, false) => self.router.take_retry(),
            };
            if !budgeted {
                tracing::warn!(drained, "retry budget spent; failing the request");
                self.metrics.retry_budget_exhausted();
                break;
            }
            self.metrics
                .placed(self.class, decision, &candidate.worker.offload.profile);
            if attempt == 0 {
                let cached = self.hits.cached(&candidate.worker.id);
                self.metrics.prefix_placement(self.class, cached);
            }
            let migrating = attempt > 0 && !generated.is_empty();
            if let Some(failed) = last.as_ref().filter(|_| !migrating) {
                self.metrics.retry(self.class, failed.code());
            }
            // A migration gets its own span; the attempt on the new worker nests under it.
            let outer = if migrating {
                migrations += 1;
                self.metrics.migration(self.class);
                tracing::info!(worker = %candidate.worker.id, tokens = generated.len(), "migrating stream");
                tracing::info_span!(
                    "gateway.migration",
                    to_worker = %candidate.worker.id,
                    tokens = generated.len()
                )
            } else {
                Span::current()
            };
            let span = tracing::info_span!(
                parent: &outer,
                "gateway.attempt",
                attempt,
                worker = %candidate.worker.id,
                profile = %candidate.worker.offload.profile,
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
            );
            tried.insert(candidate.worker.id.clone());
            model.clone_from(&candidate.worker.model.name);
            let produced_before = generated.len();
            let outcome = self
                .attempt(&candidate, &mut generated, migrations, invariant_so_far)
                .instrument(span.clone())
                .await;
            drop(outer);
            if generated.len() > produced_before {
                invariant_so_far &= candidate.worker.batch_invariant == Some(true);
                producer_fingerprint = candidate
                    .worker
                    .system_fingerprint
                    .clone()
                    .unwrap_or_default();
            }
            if !generated.is_empty() {
                // The client has this model's tokens: only the same model may continue them.
                continuity.pin(&candidate.worker);
            }
            drained = false;
            match outcome {
                Outcome::Done => {
                    self.router.worker_succeeded(&candidate.worker.id);
                    return Ok(Code::Ok);
                }
                Outcome::ClientGone => return Ok(Code::Cancelled),
                Outcome::ClientStalled => return Err(self.client_stalled()),
                Outcome::Drained => {
                    drained = true;
                    last = Some(Status::unavailable(
                        "worker cancelled the stream while draining",
                    ));
                }
                Outcome::Failed { status, retryable } => {
                    if retryable && status.code() != Code::ResourceExhausted {
                        // Unreachable, reset, silent or failing: counts towards ejection.
                        if self.router.worker_failed(&candidate.worker.id) {
                            self.metrics.worker_ejected();
                        }
                    }
                    // Too long for this worker's context: a worker with a larger one may fit.
                    let retryable = retryable || status.code() == Code::OutOfRange;
                    if status.code() == Code::OutOfRange {
                        continuity.refused_too_long(&candidate.worker);
                    }
                    span.record("otel.status_code", "ERROR");
                    tracing::warn!(worker = %candidate.worker.id, code = ?status.code(), message = status.message(), retryable, "worker attempt failed");
                    if !retryable {
                        return Err(status);
                    }
                    last = Some(status);
                }
            }
            if Instant::now() >= self.deadline {
                return Err(deadline_passed());
            }
            if generated.len() as u32 >= self.req.max_tokens {
                // The client has every token it asked for: end the stream here, whether or
                // not another worker is left, without calling one.
                return self
                    .write_final(
                        generated.len() as u32,
                        migrations,
                        invariant_so_far,
                        &producer_fingerprint,
                    )
                    .await;
            }
        }
        let status = match last {
            // No worker with a larger context was left to try: the refusal is the answer.
            Some(s) if s.code() == Code::OutOfRange => s,
            // Every worker tried had its admission queue full (or the wait timed out there):
            // the client should come back later, and is told when.
            Some(s) if s.code() == Code::ResourceExhausted => {
                let wait = self.router.expected_wait(&self.demand(generated.len()));
                crate::admission::exhausted_after(
                    format!("every worker tried refused: {}", s.message()),
                    crate::admission::retry_hint(wait),
                )
            }
            Some(s) => Status::unavailable(format!(
                "all workers tried failed; last error: {:?} {}",
                s.code(),
                s.message()
            )),
            None => Status::unavailable("no worker could take the request"),
        };
        Err(status)
    }

    /// The final message for a stream whose worker produced every one of the `tokens` the
    /// request asked for but died before its own final message: LENGTH, as that worker's would
    /// have said, its `system_fingerprint` from the worker's advert (`producer_fingerprint`).
    async fn write_final(
        &self,
        tokens: u32,
        migrations: u32,
        invariant_so_far: bool,
        producer_fingerprint: &str,
    ) -> End {
        let final_msg = GenerateResponse {
            finish_reason: FinishReason::Length as i32,
            usage: Some(Usage {
                // A worker's count when the gateway tokenized the request; never the estimate.
                prompt_tokens: if self.prompt_tokens_exact {
                    self.prompt_tokens
                } else {
                    0
                },
                completion_tokens: tokens,
                cached_prompt_tokens: 0,
            }),
            request_id: self.req.request_id.clone(),
            migrations,
            // The workers that produced the tokens: all of them batch-invariant or not.
            batch_invariant: invariant_so_far,
            // What that worker's own final message would have said, from its advert.
            system_fingerprint: producer_fingerprint.to_string(),
            ..Default::default()
        };
        match self.send(final_msg).await {
            Ok(()) => Ok(Code::Ok),
            Err(Outcome::ClientGone) => Ok(Code::Cancelled),
            Err(Outcome::ClientStalled) => Err(self.client_stalled()),
            Err(Outcome::Failed { status, .. }) => Err(status),
            // `send` ends in none of these; a clear status all the same, never a panic.
            Err(Outcome::Done | Outcome::Drained) => Err(Status::internal(
                "writing the final message ended in an unexpected way",
            )),
        }
    }

    fn client_stalled(&self) -> Status {
        tracing::warn!(idle = ?self.idle_timeout, "client stopped reading; ending the stream");
        Status::deadline_exceeded(format!(
            "the client read nothing for {:?} (stream idle timeout)",
            self.idle_timeout
        ))
    }

    /// Sends `m` to the client, waiting at most the idle timeout (and never past the deadline)
    /// for it to make room.
    async fn send(&self, m: GenerateResponse) -> Result<(), Outcome> {
        let by = self.deadline.min(Instant::now() + self.idle_timeout);
        match timeout_at(by.into(), self.tx.send(Ok(m))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Outcome::ClientGone),
            Err(_) if Instant::now() >= self.deadline => Err(Outcome::Failed {
                status: deadline_passed(),
                retryable: false,
            }),
            Err(_) => Err(Outcome::ClientStalled),
        }
    }

    /// Records latency metrics for a message of `tokens` tokens about to go to the client;
    /// `first` when the client has no token yet.
    fn relayed(&self, relay: &mut Relay, first: bool, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let now = Instant::now();
        if first {
            self.metrics.first_token(
                &relay.labels,
                now.duration_since(self.started).as_secs_f64(),
            );
        }
        let gap = relay
            .last_token
            .map(|t| now.duration_since(t).as_secs_f64());
        self.metrics.tokens(&relay.labels, tokens as u64, gap);
        relay.last_token = Some(now);
    }

    fn demand(&self, generated: usize) -> Demand<'_> {
        Demand {
            model: &self.req.model,
            class: class_of(&self.req),
            prompt_tokens: self.prompt_tokens + generated as u32,
            max_tokens: self.req.max_tokens.saturating_sub(generated as u32),
            needs: moe_common::registry::Features::needed_by(&self.req),
            batch_invariant: self.req.batch_invariant,
        }
    }

    /// One attempt on `c`, continuing after the `generated` tokens. `invariant_so_far`: every
    /// worker that produced those tokens was batch-invariant (the final message's
    /// `batch_invariant` is true only then).
    async fn attempt(
        &self,
        c: &Candidate,
        generated: &mut Vec<u32>,
        migrations: u32,
        invariant_so_far: bool,
    ) -> Outcome {
        let before = generated.len() as u32;
        let _reservation = self
            .router
            .reserve(&c.worker.id, self.demand(generated.len()).kv_tokens());
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Outcome::Failed {
                status: deadline_passed(),
                retryable: false,
            };
        }
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let silent = |waited: Duration| Outcome::Failed {
            status: Status::unavailable(format!(
                "worker sent nothing for {waited:?} (--stream-idle-timeout, or \
                 --first-message-timeout before its first message)"
            )),
            retryable: true,
        };
        // Before the worker's first message it may be queueing or prefilling; after it, the
        // stream idle timeout applies between messages.
        let mut wait = self.first_message_timeout;
        let expired = || Outcome::Failed {
            status: deadline_passed(),
            retryable: false,
        };
        let channel = match self.router.channel(&c.worker.endpoint) {
            Ok(ch) => ch,
            Err(e) => {
                return Outcome::Failed {
                    status: Status::unavailable(format!("bad worker endpoint: {e}")),
                    retryable: true,
                };
            }
        };
        let mut wreq = self.req.clone();
        wreq.resume_token_ids = generated.clone();
        let mut request = Request::new(wreq);
        request.set_timeout(remaining);
        moe_common::telemetry::propagation::inject(&Span::current(), request.metadata_mut());
        let mut client = InferenceClient::new(channel);
        let response = tokio::select! {
            r = client.generate(request) => r,
            _ = self.tx.closed() => return Outcome::ClientGone,
            _ = sleep_until(deadline) => return expired(),
            _ = sleep(wait) => return silent(wait),
        };
        let mut stream = match response {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let retryable = retryable(&status);
                return Outcome::Failed { status, retryable };
            }
        };
        let mut relay = Relay {
            labels: StreamLabels {
                model: c.worker.model.name.clone(),
                class: self.class.as_str(),
                profile: c.worker.offload.profile.clone(),
            },
            // Also None after a migration: the hand-over is not counted as an inter-token gap.
            last_token: None,
        };
        // Every return drops the worker stream, which cancels the sequence on the worker.
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = self.tx.closed() => return Outcome::ClientGone,
                _ = sleep_until(deadline) => return expired(),
                _ = sleep(wait) => return silent(wait),
            };
            wait = self.idle_timeout;
            match msg {
                Ok(Some(mut m)) => {
                    self.relayed(&mut relay, generated.is_empty(), m.token_ids.len());
                    generated.extend_from_slice(&m.token_ids);
                    if let Some(g) = &self.grant {
                        g.generated(m.token_ids.len());
                    }
                    let finish = FinishReason::try_from(m.finish_reason)
                        .unwrap_or(FinishReason::Unspecified);
                    if finish == FinishReason::Cancelled && Instant::now() < self.deadline {
                        // The worker gave up on the stream (drain): continue elsewhere.
                        return Outcome::Drained;
                    }
                    if finish != FinishReason::Unspecified {
                        m.migrations = migrations;
                        // After a migration, invariant only if the earlier workers were too.
                        m.batch_invariant &= invariant_so_far;
                        if let Some(u) = m.usage.as_mut() {
                            u.completion_tokens += before;
                        }
                    }
                    if let Err(o) = self.send(m).await {
                        return o;
                    }
                    if finish != FinishReason::Unspecified {
                        return Outcome::Done;
                    }
                }
                Ok(None) => {
                    return Outcome::Failed {
                        status: Status::unavailable(
                            "worker ended the stream without a final message",
                        ),
                        retryable: true,
                    };
                }
                Err(status) => {
                    let retryable = retryable(&status);
                    return Outcome::Failed { status, retryable };
                }
            }
        }
    }
}
