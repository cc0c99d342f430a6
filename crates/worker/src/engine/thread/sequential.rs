//! `--sequential-decode`: one llama.cpp call per sequence, so GPU kernels (which choose their
//! algorithm by batch shape) see a solo run's shapes whatever else shares the step.

use std::time::Instant;

use llama_cpp_2::token::LlamaToken;

use super::super::batcher::Plan;
use super::Engine;

impl Engine<'_> {
    /// One llama.cpp call per sequence (`--sequential-decode`): each sequence's tokens are
    /// decoded and sampled alone, so its kernels see the shapes of a solo run whatever else
    /// shares the step.
    pub(super) fn step_sequential(&mut self, plan: &Plan) -> bool {
        let started = Instant::now();
        let mut n_prefill = 0;
        for e in &plan.entries {
            self.batch.clear();
            let last = e.tokens.len() - 1;
            for (i, &t) in e.tokens.iter().enumerate() {
                self.batch
                    .add(
                        LlamaToken(t as i32),
                        (e.pos + i as u32) as i32,
                        &[e.seq_id],
                        e.sample && i == last,
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
        }
        let elapsed = started.elapsed().as_secs_f64().max(1e-6);
        self.update_speed(n_prefill, elapsed);
        true
    }
}
