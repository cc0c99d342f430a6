//! The engine thread: owns the model and context and runs the continuous-batching loop —
//! intake, cancellation, plan, decode, sample, stream — publishing live stats (including
//! device memory, refreshed here so that no FFI runs on the async runtime). The loop, decode,
//! sampling and the INTERACTIVE reserve are here; submodules hold the intake and housekeeping
//! (`intake`), the prefix cache's KV operations and publishing (`prefix`), stats (`stats`),
//! sequential decode and the per-call helpers shared with the other modes (`sequential`) and
//! grouped decode (`grouped`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot, watch};

mod grouped;
mod intake;
mod prefix;
mod sequential;
mod stats;

use super::batcher::{Batcher, BatcherConfig};
use super::load;
use super::sampler::SeqSampler;
use super::text::Detokenizer;
use super::{
    Command, DecodeMode, EngineConfig, EngineError, EngineStats, Event, Finish, LoadedModel,
    PrefixCacheView, Summary, TokenLogprob, Tokenizer,
};

/// How often device memory (free bytes, this process's bytes per GPU) is refreshed.
const DEVICE_REFRESH: Duration = Duration::from_secs(5);

/// The engine thread's body: loads, reports readiness, runs until shutdown.
pub(super) fn engine_thread(
    config: EngineConfig,
    cmd_rx: mpsc::Receiver<Command>,
    stats_tx: watch::Sender<EngineStats>,
    cache_tx: watch::Sender<Arc<PrefixCacheView>>,
    ready: oneshot::Sender<Result<(LoadedModel, Tokenizer), EngineError>>,
) {
    let mut ready = Some(ready);
    let opened = load::open(&config, |model, ctx, info, tokenizer| {
        let context_tokens = info.context_tokens;
        let sliding_window = info.sliding_window;
        let decode_mode = info.decode_mode;
        let invariant_kernels = info.invariant_kernels;
        // Prompts one sequence per call at fixed boundaries (`sequential`, `grouped`).
        let per_sequence_prefill =
            matches!(decode_mode, DecodeMode::Sequential | DecodeMode::Grouped);
        tracing::info!(
            model = %info.info.name, profile = %info.profile, n_cpu_moe = info.plan.n_cpu_moe,
            ctx = context_tokens, parallel = config.parallel,
            cache_sequences = info.cache_sequences, sequence_tokens = info.sequence_tokens,
            decode_mode = info.decode_mode.as_str(), batch_invariant = info.batch_invariant,
            system_fingerprint = %info.system_fingerprint, threads = load::threads(&config),
            "model loaded"
        );
        let batcher = Batcher::new(BatcherConfig {
            max_sequences: config.parallel,
            cache_streams: info.cache_sequences,
            kv_tokens: context_tokens,
            slot_kv_tokens: (!config.kv_unified).then_some(info.sequence_tokens),
            step_tokens: config.batch_size,
            // Sequential and grouped decode are exact: prompt chunks at fixed boundaries, reuse
            // of whole chunks only (docs/benchmarks/batch-invariance.md).
            aligned_prefill: per_sequence_prefill.then_some(config.batch_size),
            batch_prefill_tokens_under_interactive: (config.batch_size / 4).max(config.parallel),
            // One slot in 16 (4 of 64), at least one from --parallel 2, stays free of batch
            // work for interactive arrivals (review M6).
            interactive_reserved_sequences: interactive_reserve(config.parallel),
            max_queue: config.max_queue,
            queue_timeout: config.queue_timeout,
            // Calls of several sequences need their streams consecutive to stay one graph.
            compact_streams: !config.kv_unified && decode_mode != DecodeMode::Sequential,
        });
        let stats = EngineStats {
            context_tokens,
            free_kv_tokens: context_tokens,
            max_sequences: config.parallel,
            devices: info.devices.clone(),
            ..Default::default()
        };
        // Published before the worker reports ready, so no advert shows the empty defaults.
        stats_tx.send_replace(stats.clone());
        if let Some(r) = ready.take() {
            let _ = r.send(Ok((info, tokenizer)));
        }
        let mut engine = Engine {
            model,
            ctx,
            batcher,
            batch: LlamaBatch::new(config.batch_size as usize, config.parallel as i32),
            stats,
            stats_tx,
            cache_tx,
            cache_version: 0,
            last_publish: Instant::now(),
            last_refresh: Instant::now(),
            sliding_window,
            decode_mode,
            grouped_rows: config.grouped_rows.max(1),
            invariant_kernels,
            // Off since load (`load::load_model`): the first decode call switches them on.
            invariant_kernels_on: false,
            rotation: 0,
            deferred: None,
            disconnected: false,
            panic_after: cfg!(debug_assertions)
                .then(|| std::env::var("MOE_TEST_ENGINE_PANIC_AFTER").ok())
                .flatten()
                .and_then(|v| v.parse().ok()),
        };
        engine.run(cmd_rx);
    });
    match opened {
        Ok(()) => tracing::info!("engine stopped"),
        Err(e) => {
            if let Some(r) = ready.take() {
                let _ = r.send(Err(e));
            }
        }
    }
}

/// Per-sequence state that lives only on the engine thread.
struct Live {
    events: super::EventSender,
    sampler: SeqSampler,
    /// Token ids go out only together with their text (see `Detokenizer`).
    text: Detokenizer,
    /// Detokenize with special tokens rendered (harmony replies, raw output).
    special: bool,
    /// Log-probabilities of tokens whose text is held back, sent with their ids.
    logprobs: std::collections::VecDeque<TokenLogprob>,
    prompt_tokens: u32,
    deadline: Option<Instant>,
    arrived: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Instant,
    /// The request's span (`worker.request`), which engine steps link to.
    span: tracing::Span,
    /// The span of the phase the sequence is in: `worker.queue`, `worker.prefill`, then
    /// `worker.decode`; replacing it ends the previous phase.
    phase: tracing::Span,
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batcher: Batcher<Live>,
    batch: LlamaBatch<'static>,
    stats: EngineStats,
    stats_tx: watch::Sender<EngineStats>,
    /// Where the token sequences the KV streams hold are published (`PrefixCacheView`).
    cache_tx: watch::Sender<Arc<PrefixCacheView>>,
    /// The batcher's `cache_version` last published.
    cache_version: u64,
    last_publish: Instant,
    last_refresh: Instant,
    /// The model's sliding window (0: none), for prefix reuse.
    sliding_window: u32,
    /// The resolved decode mode: `Sequential`, `Grouped` or `Batched`.
    decode_mode: DecodeMode,
    /// Grouped decode: the most sequences in one call of decodes (`--grouped-rows`, >= 1).
    grouped_rows: usize,
    /// Grouped decode: the patches' row-invariant kernels (CUDA's, the CPU's), on for calls of
    /// decodes and off for prompt chunks (`InvariantKernels`), and whether they are on now.
    invariant_kernels: Option<super::devices::InvariantKernels>,
    invariant_kernels_on: bool,
    /// Sequential decode: where this step's round of decodes starts, advanced every step, so a
    /// step cut short for an INTERACTIVE arrival does not always postpone the same sequences.
    rotation: usize,
    /// A shutdown read from the command channel in the middle of a step, handled after it.
    deferred: Option<Command>,
    /// The command channel closed in the middle of a step.
    disconnected: bool,
    /// Test-only hook (debug builds): panic after this many generated tokens
    /// (`MOE_TEST_ENGINE_PANIC_AFTER`), for the supervision test (review H3).
    panic_after: Option<u64>,
}

impl<'m> Engine<'m> {
    fn run(&mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        // A timer for the idle wait; the thread runs no other async work.
        let idle = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime with a timer");
        loop {
            if self.batcher.is_idle() {
                self.publish(true);
                // Idle: wait for work, waking up to refresh device memory.
                let next = idle
                    .block_on(async { tokio::time::timeout(DEVICE_REFRESH, cmd_rx.recv()).await });
                match next {
                    Ok(Some(cmd)) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(_) => continue,
                }
            }
            if let Some(cmd) = self.deferred.take()
                && !self.handle(cmd)
            {
                return;
            }
            if self.disconnected {
                self.cancel_all();
                return;
            }
            loop {
                match cmd_rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.cancel_all();
                        return;
                    }
                }
            }
            self.housekeeping(Instant::now());
            let stepped = self.step(&mut cmd_rx);
            self.publish_cache();
            if !stepped {
                // Nothing runnable (requests wait for KV): wait briefly for completions/intake.
                std::thread::sleep(Duration::from_millis(2));
            }
            self.publish(false);
        }
    }

    /// Returns false when the engine must stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(job) => {
                self.submit(*job);
                true
            }
            Command::Shutdown => {
                self.cancel_all();
                self.publish(true);
                false
            }
        }
    }

    /// Plans and runs one decode step. Returns false when there was nothing to run.
    fn step(&mut self, cmd_rx: &mut mpsc::Receiver<Command>) -> bool {
        let now = Instant::now();
        // Planning again after a slot lost its prefix reuse: that slot then prefills from 0.
        let plan = loop {
            let plan = self.batcher.plan(now);
            if !self.apply_admissions(&plan, now) {
                break plan;
            }
        };
        // After admission: what is still queued did not fit (see `expire_queued`).
        self.expire_queued(now);
        if plan.entries.is_empty() {
            return false;
        }
        // One span per step, linked to the requests whose sequences it advances.
        let step = tracing::info_span!(
            parent: None,
            "engine.step",
            sequences = plan.entries.len(),
            tokens = plan.n_tokens()
        );
        for e in &plan.entries {
            if let Some(seq) = self.batcher.seq_mut(e.slot) {
                step.follows_from(&seq.payload.span);
            }
        }
        let _step = step.enter();
        match self.decode_mode {
            DecodeMode::Sequential => return self.step_sequential(&plan, cmd_rx),
            DecodeMode::Grouped => return self.step_grouped(&plan, cmd_rx),
            DecodeMode::Batched | DecodeMode::Auto => {}
        }
        let n_prefill = plan.n_tokens()
            - plan
                .entries
                .iter()
                .filter(|e| e.tokens.len() == 1 && e.sample)
                .count();
        // Every entry in one call; a failed call fails them all.
        let all: Vec<usize> = (0..plan.entries.len()).collect();
        if let Some(secs) = self.run_call(&plan, &all) {
            self.update_speed(n_prefill, secs);
        }
        true
    }

    /// Ends a slot's sequence with an internal error after a failed decode and drops its cells.
    fn fail_slot(&mut self, slot: usize, why: &str) {
        if let Some(seq) = self.batcher.finish(slot) {
            self.batcher.forget(slot);
            let _ = self
                .ctx
                .clear_kv_cache_seq(Some(seq.seq_id as u32), None, None);
            self.publish_cache();
            let _ = seq
                .payload
                .events
                .send(Event::Failed(EngineError::Internal(why.to_string())));
        }
    }

    fn sample(&mut self, slot: usize, idx: i32) {
        let Some(seq) = self.batcher.seq_mut(slot) else {
            return;
        };
        let token = seq.payload.sampler.sample(&self.ctx, idx);
        let now = Instant::now();
        let live = &mut seq.payload;
        if live.first_token.is_none() {
            live.phase = tracing::info_span!(parent: &live.span, "worker.decode");
        }
        live.first_token.get_or_insert(now);
        live.last_token = now;
        self.stats.generated_tokens_total += 1;
        if self
            .panic_after
            .is_some_and(|n| self.stats.generated_tokens_total >= n)
        {
            panic!("MOE_TEST_ENGINE_PANIC_AFTER: test-only engine panic");
        }
        if self.model.vocab().is_eog(token) {
            self.end(slot, Finish::Stop);
            return;
        }
        let at_limit = self.batcher.push_token(slot, token.0 as u32);
        let seq = self.batcher.seq_mut(slot).expect("slot still active");
        let live = &mut seq.payload;
        let bytes = self.model.vocab().token_to_piece(token, live.special, None);
        if let Some((logprob, top)) = live.sampler.take_logprob() {
            let piece = |t: u32| {
                self.model
                    .vocab()
                    .token_to_piece(LlamaToken(t as i32), live.special, None)
            };
            let top = top.into_iter().map(|(t, l)| (t, piece(t), l)).collect();
            live.logprobs.push_back(TokenLogprob {
                token: token.0 as u32,
                bytes: bytes.clone(),
                logprob,
                top,
            });
        }
        let released = live.text.push(token.0 as u32, &bytes);
        let stopped = released.stopped;
        if !released.is_empty() {
            let n = released.token_ids.len().min(live.logprobs.len());
            let _ = live.events.send(Event::Delta {
                text: released.text,
                token_ids: released.token_ids,
                logprobs: live.logprobs.drain(..n).collect(),
            });
        }
        if stopped {
            self.end(slot, Finish::Stop);
        } else if at_limit {
            self.end(slot, Finish::Length);
        }
    }

    /// Finishes a sequence normally: flushes held text, sends the summary, frees the slot.
    fn end(&mut self, slot: usize, finish: Finish) {
        // The sequence's cells stay in the KV cache as the slot's prefix cache.
        let Some(mut seq) = self.batcher.finish(slot) else {
            return;
        };
        let live = &mut seq.payload;
        // Held text goes out with its token ids. Not on Cancelled (drain, deadline): the
        // gateway replays only the ids the client has text for, and the next worker generates
        // the held tokens again.
        if finish != Finish::Cancelled {
            let released = live.text.finish();
            if !released.is_empty() {
                let n = released.token_ids.len().min(live.logprobs.len());
                let _ = live.events.send(Event::Delta {
                    text: released.text,
                    token_ids: released.token_ids,
                    logprobs: live.logprobs.drain(..n).collect(),
                });
            }
        }
        let admitted = live.admitted.unwrap_or(live.arrived);
        let first = live.first_token.unwrap_or(live.last_token);
        let decode_secs = live
            .last_token
            .saturating_duration_since(first)
            .as_secs_f64();
        let summary = Summary {
            finish,
            prompt_tokens: live.prompt_tokens,
            completion_tokens: seq.generated,
            cached_prompt_tokens: seq.reused,
            queue: admitted.saturating_duration_since(live.arrived),
            time_to_first_token: first.saturating_duration_since(live.arrived),
            decode_tokens_per_second: if seq.generated > 1 && decode_secs > 0.0 {
                (seq.generated - 1) as f64 / decode_secs
            } else {
                0.0
            },
        };
        self.stats.completed_total += 1;
        // The gateway routes the conversation's next turn by what this worker caches: the
        // finished sequence's tokens are published before the client hears it is done.
        self.publish_cache();
        let _ = seq.payload.events.send(Event::Done(summary));
    }

    /// Frees a slot whose client is gone, sending nothing.
    fn release(&mut self, slot: usize) {
        // Its cells stay in the KV cache as the slot's prefix cache.
        self.batcher.finish(slot);
    }

    fn cancel_all(&mut self) {
        for p in self.batcher.drain_queued(|_| true) {
            let _ = p
                .payload
                .events
                .send(Event::Failed(EngineError::Unavailable(
                    "worker is shutting down".into(),
                )));
        }
        for slot in self.batcher.slots_where(|_| true) {
            self.end(slot, Finish::Cancelled);
        }
    }
}

/// Sequence slots BATCH work may not take: one in 16, and at least one whenever there are two
/// or more slots (with one slot, reserving it would shut BATCH out).
pub(crate) fn interactive_reserve(parallel: u32) -> u32 {
    if parallel >= 2 {
        (parallel / 16).max(1)
    } else {
        0
    }
}

/// Places of the admission queue BATCH requests may fill: all but an eighth (at least one) when
/// slots are reserved for INTERACTIVE work, so an INTERACTIVE arrival always finds a place.
pub(crate) fn batch_queue_share(c: &BatcherConfig) -> usize {
    if c.interactive_reserved_sequences == 0 || c.max_queue < 2 {
        return c.max_queue;
    }
    c.max_queue - (c.max_queue / 8).max(1)
}

#[cfg(test)]
mod admission_tests {
    use super::interactive_reserve;

    #[test]
    fn at_least_one_interactive_slot_from_two_slots_on() {
        assert_eq!(interactive_reserve(1), 0);
        assert_eq!(interactive_reserve(2), 1);
        assert_eq!(interactive_reserve(4), 1);
        assert_eq!(interactive_reserve(16), 1);
        assert_eq!(interactive_reserve(64), 4);
    }
}
