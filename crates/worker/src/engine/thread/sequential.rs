//! `--decode-mode sequential`: one llama.cpp call per sequence, so GPU kernels (which choose
//! their algorithm by batch shape) see a solo run's shapes whatever else shares the step.
//!
//! A step is a round of such calls, so it lasts as long as all of them together (64 decodes of
//! a 20B model are ≈ 200 ms on an H200). An INTERACTIVE request must not wait for that: the
//! batcher puts an INTERACTIVE prompt's prefill first and whole in its step, and a step is cut
//! short when an INTERACTIVE request arrives while it runs (the entries not run stay as they
//! were and run in the next step, which starts with the newcomer's prefill). The order of a
//! step's decodes rotates from step to step, so cuts do not keep postponing the same
//! sequences. Each sequence's own computation is the same whatever the order.
//!
//! The calls of a step ([`calls`]), running them ([`Engine::run_calls`]) and one call
//! ([`Engine::run_call`], also the batched step's) are shared with `grouped`, which runs
//! prompt chunks the same way and a step's decodes together, in calls of at most
//! `--grouped-rows` sequences.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::super::Command;
use super::super::batcher::{Entry, Plan};
use super::Engine;
use moe_common::LatencyClass;

/// How a step runs its single-token decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decodes {
    /// One call each, the round starting at `rotation` (modulo their number): `sequential`.
    Each { rotation: usize },
    /// In consecutive calls of at most `max_rows` sequences each (at least 1), the round of
    /// calls starting at `rotation` (modulo their number): `grouped`. The step may be cut short
    /// between them like between any two calls, and the rotation keeps such cuts from always
    /// postponing the same sequences.
    Together { max_rows: usize, rotation: usize },
}

/// What the calls of a step ran.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Ran {
    /// Prompt tokens in the calls that ran.
    pub prefill_tokens: usize,
    /// Seconds in llama.cpp of the calls with prompt tokens.
    pub prefill_secs: f64,
    /// Seconds in llama.cpp of the calls of decodes only.
    pub decode_secs: f64,
    /// Whether the step was cut short for an INTERACTIVE arrival (calls left unrun).
    pub cut: bool,
}

/// Whether an entry is a decode: one sampled token of a sequence with no other entry in the
/// step (the last token of a prompt whose earlier chunks are in the step is prefill, which
/// keeps its place after them).
fn is_decode(entries: &[Entry], e: &Entry) -> bool {
    e.tokens.len() == 1 && e.sample && entries.iter().filter(|o| o.slot == e.slot).count() == 1
}

/// A step's llama.cpp calls in order, each a list of indices into `entries`: INTERACTIVE
/// prompt chunks first, one per call in plan order (so a prompt's chunks stay in sequence),
/// then the decodes (`how`), then the other prompt chunks, one per call in plan order.
/// `interactive` says whether an entry's sequence is INTERACTIVE.
pub(super) fn calls(
    entries: &[Entry],
    interactive: impl Fn(&Entry) -> bool,
    how: Decodes,
) -> Vec<Vec<usize>> {
    let (decodes, prefill): (Vec<usize>, Vec<usize>) =
        (0..entries.len()).partition(|&i| is_decode(entries, &entries[i]));
    let (first, rest): (Vec<usize>, Vec<usize>) =
        prefill.into_iter().partition(|&i| interactive(&entries[i]));
    let mut calls: Vec<Vec<usize>> = first.into_iter().map(|i| vec![i]).collect();
    match how {
        Decodes::Each { rotation } if !decodes.is_empty() => {
            let k = rotation % decodes.len();
            calls.extend(decodes[k..].iter().chain(&decodes[..k]).map(|&i| vec![i]));
        }
        Decodes::Together { max_rows, rotation } if !decodes.is_empty() => {
            let groups: Vec<Vec<usize>> = decodes
                .chunks(max_rows.max(1))
                .map(<[usize]>::to_vec)
                .collect();
            let k = rotation % groups.len();
            calls.extend(groups[k..].iter().chain(&groups[..k]).cloned());
        }
        _ => {}
    }
    calls.extend(rest.into_iter().map(|i| vec![i]));
    calls
}

impl Engine<'_> {
    /// One llama.cpp call per plan entry, in [`calls`]' order. Returns true (the step ran) even
    /// when it was cut short.
    pub(super) fn step_sequential(
        &mut self,
        plan: &Plan,
        cmd_rx: &mut mpsc::Receiver<Command>,
    ) -> bool {
        let started = Instant::now();
        let calls = self.calls(
            plan,
            Decodes::Each {
                rotation: self.rotation,
            },
        );
        self.rotation = self.rotation.wrapping_add(1);
        let ran = self.run_calls(plan, &calls, cmd_rx);
        let elapsed = started.elapsed().as_secs_f64().max(1e-6);
        self.update_speed(ran.prefill_tokens, elapsed);
        true
    }

    /// [`calls`] for this step's plan.
    pub(super) fn calls(&self, plan: &Plan, how: Decodes) -> Vec<Vec<usize>> {
        let interactive = |e: &Entry| {
            self.batcher
                .seq(e.slot)
                .is_some_and(|s| s.class == LatencyClass::Interactive)
        };
        calls(&plan.entries, interactive, how)
    }

    /// Runs a step's calls in order, stopping early when an INTERACTIVE request arrives (see
    /// the module's documentation).
    pub(super) fn run_calls(
        &mut self,
        plan: &Plan,
        calls: &[Vec<usize>],
        cmd_rx: &mut mpsc::Receiver<Command>,
    ) -> Ran {
        let mut ran = Ran::default();
        for (done, call) in calls.iter().enumerate() {
            let prefill: usize = call
                .iter()
                .map(|&i| &plan.entries[i])
                .filter(|e| !is_decode(&plan.entries, e))
                .map(|e| e.tokens.len())
                .sum();
            if let Some(secs) = self.run_call(plan, call) {
                if prefill > 0 {
                    ran.prefill_tokens += prefill;
                    ran.prefill_secs += secs;
                } else {
                    ran.decode_secs += secs;
                }
            }
            if done + 1 < calls.len() && self.interactive_arrived(cmd_rx) {
                tracing::debug!(
                    run = done + 1,
                    postponed = calls.len() - done - 1,
                    "step cut short for an INTERACTIVE arrival"
                );
                ran.cut = true;
                break;
            }
        }
        ran
    }

    /// One llama.cpp call for the plan entries `call` (those still as planned: an earlier
    /// chunk of the sequence may have failed in this step), then their commit and sampling.
    /// A failed call fails every sequence in it. Returns the seconds the call took, or None
    /// when it failed or had nothing to run.
    pub(super) fn run_call(&mut self, plan: &Plan, call: &[usize]) -> Option<f64> {
        let entries: Vec<Entry> = call
            .iter()
            .map(|&i| &plan.entries[i])
            .filter(|e| {
                self.batcher
                    .seq(e.slot)
                    .is_some_and(|s| s.seq_id == e.seq_id && s.n_past == e.pos)
            })
            .cloned()
            .collect();
        if entries.is_empty() {
            return None;
        }
        self.batch.clear();
        let mut sample_at = Vec::new();
        for e in &entries {
            let last = e.tokens.len() - 1;
            for (k, &t) in e.tokens.iter().enumerate() {
                let logits = e.sample && k == last;
                if logits {
                    sample_at.push((e.slot, self.batch.n_tokens()));
                }
                self.batch
                    .add(
                        LlamaToken(t as i32),
                        (e.pos + k as u32) as i32,
                        &[e.seq_id],
                        logits,
                    )
                    .expect("plan fits the batch");
            }
        }
        // Row-invariant kernels (grouped decode) for calls of one token per sequence,
        // the usual ones for prompt chunks.
        let decodes = entries.iter().all(|e| e.tokens.len() == 1);
        if let Some(kernels) = self.invariant_kernels
            && decodes != self.invariant_kernels_on
        {
            kernels.switch(decodes);
            self.invariant_kernels_on = decodes;
        }
        self.stats.llama_calls_total += 1;
        let started = Instant::now();
        if let Err(err) = self.ctx.decode(&mut self.batch) {
            tracing::error!(
                error = %err, sequences = entries.len(),
                "decode failed; failing the call's sequences"
            );
            for e in &entries {
                self.fail_slot(e.slot, &err.to_string());
            }
            return None;
        }
        let secs = started.elapsed().as_secs_f64().max(1e-6);
        self.batcher.commit(&Plan {
            entries,
            ..Plan::default()
        });
        for (slot, idx) in sample_at {
            self.sample(slot, idx);
        }
        Some(secs)
    }

    /// Reads the commands that arrived during the step; true when one of them queued an
    /// INTERACTIVE request (or asked the engine to stop), so the step should end now.
    fn interactive_arrived(&mut self, cmd_rx: &mut mpsc::Receiver<Command>) -> bool {
        let before = self.batcher.interactive_queued();
        loop {
            match cmd_rx.try_recv() {
                Ok(Command::Submit(job)) => self.submit(*job),
                Ok(stop @ Command::Shutdown) => {
                    self.deferred = Some(stop);
                    return true;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    return true;
                }
            }
        }
        self.batcher.interactive_queued() > before
    }
}
