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

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::super::Command;
use super::super::batcher::{Entry, Plan};
use super::Engine;
use moe_common::LatencyClass;

impl Engine<'_> {
    /// One llama.cpp call per plan entry, in `order_for_sequential`'s order. Returns true (the
    /// step ran) even when it was cut short.
    pub(super) fn step_sequential(
        &mut self,
        plan: &Plan,
        cmd_rx: &mut mpsc::Receiver<Command>,
    ) -> bool {
        let started = Instant::now();
        let mut n_prefill = 0;
        let order = self.order_for_sequential(plan);
        self.rotation = self.rotation.wrapping_add(1);
        for (done, &i) in order.iter().enumerate() {
            let e = &plan.entries[i];
            // An earlier chunk of this sequence failed (slot freed) in this step.
            if self
                .batcher
                .seq(e.slot)
                .is_none_or(|s| s.seq_id != e.seq_id || s.n_past != e.pos)
            {
                continue;
            }
            self.batch.clear();
            let last = e.tokens.len() - 1;
            for (k, &t) in e.tokens.iter().enumerate() {
                self.batch
                    .add(
                        LlamaToken(t as i32),
                        (e.pos + k as u32) as i32,
                        &[e.seq_id],
                        e.sample && k == last,
                    )
                    .expect("plan fits the batch");
            }
            if !(e.tokens.len() == 1 && e.sample) {
                n_prefill += e.tokens.len();
            }
            if let Err(err) = self.ctx.decode(&mut self.batch) {
                tracing::error!(error = %err, slot = e.slot, "decode failed; failing the sequence");
                self.fail_slot(e.slot, &err.to_string());
                continue;
            }
            let one = Plan {
                entries: vec![e.clone()],
                ..Plan::default()
            };
            self.batcher.commit(&one);
            if e.sample {
                self.sample(e.slot, last as i32);
            }
            if done + 1 < order.len() && self.interactive_arrived(cmd_rx) {
                tracing::debug!(
                    run = done + 1,
                    postponed = order.len() - done - 1,
                    "sequential step cut short for an INTERACTIVE arrival"
                );
                break;
            }
        }
        let elapsed = started.elapsed().as_secs_f64().max(1e-6);
        self.update_speed(n_prefill, elapsed);
        true
    }

    /// The order of a step's calls: INTERACTIVE prefill chunks first (in plan order, so a
    /// prompt's chunks stay in sequence), then the rest rotated by the step count.
    fn order_for_sequential(&self, plan: &Plan) -> Vec<usize> {
        let interactive_prefill = |e: &Entry| {
            !(e.tokens.len() == 1 && e.sample)
                && self
                    .batcher
                    .seq(e.slot)
                    .is_some_and(|s| s.class == LatencyClass::Interactive)
        };
        let (mut first, rest): (Vec<usize>, Vec<usize>) =
            (0..plan.entries.len()).partition(|&i| interactive_prefill(&plan.entries[i]));
        // Batch prefill chunks of one sequence must also keep their order: rotate only the
        // single-token decodes, which are one per sequence.
        let (decodes, others): (Vec<usize>, Vec<usize>) = rest
            .into_iter()
            .partition(|&i| plan.entries[i].tokens.len() == 1 && plan.entries[i].sample);
        if !decodes.is_empty() {
            let k = self.rotation % decodes.len();
            first.extend(decodes[k..].iter().chain(&decodes[..k]));
        }
        first.extend(others);
        first
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
