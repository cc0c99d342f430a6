//! Intake on the engine thread: a submitted job becomes a queued request (resume tokens
//! checked and fed to its sampler, BATCH kept to its share of the queue), and between steps
//! requests whose client went away, whose deadline passed or that waited too long are dropped
//! or refused.

use std::time::Instant;

use super::super::batcher::{Pending, Refusal};
use super::super::sampler::SeqSampler;
use super::super::text::Detokenizer;
use super::super::{EngineError, Event, Finish, Job, PreparedPrompt};
use super::{Engine, Live, batch_queue_share};

impl Engine<'_> {
    pub(super) fn submit(&mut self, job: Job) {
        let events = job.events.clone();
        let PreparedPrompt {
            mut tokens,
            grammar,
            render_special: special,
        } = job.prompt;
        let prompt_tokens = tokens.len() as u32;
        let n_vocab = self.model.n_vocab() as u32;
        if let Some(bad) = job.resume_tokens.iter().find(|&&t| t >= n_vocab) {
            let _ = events.send(Event::Failed(EngineError::InvalidArgument(format!(
                "resume token {bad} is outside the vocabulary ({n_vocab})"
            ))));
            return;
        }
        if job.resume_tokens.len() as u32 >= job.max_tokens {
            let _ = events.send(Event::Failed(EngineError::InvalidArgument(
                "resume_token_ids must be fewer than max_tokens".into(),
            )));
            return;
        }
        let mut sampler = SeqSampler::new(&job.sampling, self.model.n_vocab());
        if let Some(g) = &grammar {
            sampler = match sampler.with_grammar(self.model, g) {
                Ok(s) => s,
                Err(e) => {
                    let _ = events.send(Event::Failed(EngineError::InvalidArgument(e)));
                    return;
                }
            };
        }
        sampler.accept(&job.resume_tokens);
        tokens.extend_from_slice(&job.resume_tokens);
        let pending = Pending {
            tokens,
            max_tokens: job.max_tokens - job.resume_tokens.len() as u32,
            class: job.class,
            enqueued: job.arrived,
            payload: Live {
                events: job.events,
                sampler,
                text: Detokenizer::new(job.stop),
                special,
                logprobs: Default::default(),
                prompt_tokens,
                deadline: job.deadline,
                arrived: job.arrived,
                admitted: None,
                first_token: None,
                last_token: job.arrived,
                phase: tracing::info_span!(parent: &job.span, "worker.queue"),
                span: job.span,
            },
        };
        // BATCH fills the admission queue only up to its share: queued batch work never makes
        // an INTERACTIVE arrival find the queue full (review M6).
        let share = batch_queue_share(self.batcher.config());
        if pending.class == moe_common::LatencyClass::Batch && self.batcher.queued() >= share {
            let _ = pending.payload.events.send(Event::Failed(EngineError::ResourceExhausted(
                format!("admission queue is full for BATCH requests ({share} waiting; the rest of --max-queue is kept for INTERACTIVE)"),
            )));
        } else if let Err((why, p)) = self.batcher.enqueue(pending) {
            let _ = p.payload.events.send(Event::Failed(refusal_error(why)));
        }
    }

    /// Drops work whose client went away or whose deadline passed. Requests that waited too
    /// long are refused after the next admission attempt instead ([`Self::expire_queued`]).
    pub(super) fn housekeeping(&mut self, now: Instant) {
        let gone = |l: &Live| l.events.is_closed();
        let late = |l: &Live| l.deadline.is_some_and(|d| d <= now);
        for p in self
            .batcher
            .drain_queued(|p| gone(&p.payload) || late(&p.payload))
        {
            if gone(&p.payload) {
                self.stats.cancelled_total += 1;
            } else {
                let _ = p
                    .payload
                    .events
                    .send(Event::Failed(EngineError::DeadlineExceeded(
                        "while queued".into(),
                    )));
            }
        }
        for slot in self.batcher.slots_where(|s| gone(&s.payload)) {
            self.stats.cancelled_total += 1;
            self.release(slot);
        }
        for slot in self.batcher.slots_where(|s| late(&s.payload)) {
            self.end(slot, Finish::Cancelled);
        }
    }

    /// Refuses queued requests that waited the queue timeout; called after a step's admissions,
    /// so only requests that did not fit are refused. A request that arrived while the engine
    /// was inside a long step (a long prompt's prefill on a slow CPU took 18-50 s on a shared
    /// 2-core machine, issue 17) has waited the timeout without ever being considered: it was
    /// refused "no free sequence slot" with slots free, and the gateway retried it on a worker
    /// without its prefix cache.
    pub(super) fn expire_queued(&mut self, now: Instant) {
        for (why, p) in self.batcher.expire(now) {
            let _ = p.payload.events.send(Event::Failed(refusal_error(why)));
        }
    }
}

fn refusal_error(why: Refusal) -> EngineError {
    match why {
        Refusal::TooLong { needed, capacity } => EngineError::TooLong(format!(
            "prompt plus max_tokens needs {needed} tokens of context; a sequence on this worker has {capacity}"
        )),
        Refusal::QueueFull { limit } => {
            EngineError::ResourceExhausted(format!("admission queue is full ({limit} waiting)"))
        }
        Refusal::QueueTimeout { waited } => EngineError::ResourceExhausted(format!(
            "not admitted after waiting {:.1}s: no free sequence slot or KV cache headroom",
            waited.as_secs_f64()
        )),
    }
}
