//! `--decode-mode grouped`: batch-invariant batched decode. Prompt chunks run as in
//! `sequential` (one sequence per llama.cpp call, at fixed `--batch-size` boundaries,
//! INTERACTIVE prompts first, the step cut short between calls when an INTERACTIVE request
//! arrives), and a step's single-token decodes run together, one token and one row of logits
//! per sequence, in consecutive calls of at most `--grouped-rows` sequences (plan order). The
//! step may be cut short between those calls too: a call's time grows about linearly with its
//! rows beyond a few (≈ 150 ms for 60 rows of gpt-oss-20b on an H200), so an INTERACTIVE
//! arrival waits for at most one call of `--grouped-rows`; the decodes not run stay as they
//! were (uncommitted) and run in the next step, like sequential mode's postponed entries. Such
//! a call is batch-invariant only where every kernel computes each row as it would alone, so
//! how the decodes are split does not change the output: with moe-cluster's llama.cpp patches
//! (`devices::InvariantKernels`, switched on for calls of decodes and off for prompt chunks,
//! which are alone in their calls anyway) — CUDA's (0001) on an accelerator with every routed
//! expert in GPU memory (H200 `full`: 16/16 and 8/8 concurrent runs equal to solo), the CPU's
//! (0002) on a CPU-only worker built for AVX2 without AVX-512 (where it was verified), and both
//! with routed experts in host memory on an accelerator, where CUDA's version 2 also keeps
//! llama.cpp's op offload off (H200 `cpu-moe`: 8/8, 16/16, 8/8). `load` resolves `auto` to
//! `grouped` exactly where it is invariant (`grouped_invariant`), refuses an explicit `grouped`
//! on an accelerator where it would not be, and a CPU-only `grouped` worker without the CPU
//! kernels does not advertise `batch_invariant`. A call's sequences are one llama.cpp graph
//! only when their KV streams are consecutive, which the batcher keeps so by moving streams
//! (`BatcherConfig::compact_streams`).

use tokio::sync::mpsc;

use super::super::Command;
use super::super::batcher::Plan;
use super::Engine;
use super::sequential::Decodes;

impl Engine<'_> {
    /// Runs the step's calls ([`super::sequential::calls`] with [`Decodes::Together`], at
    /// most `--grouped-rows` decodes a call). Returns true (the step ran) even when it was cut
    /// short.
    pub(super) fn step_grouped(
        &mut self,
        plan: &Plan,
        cmd_rx: &mut mpsc::Receiver<Command>,
    ) -> bool {
        let calls = self.calls(
            plan,
            Decodes::Together {
                max_rows: self.grouped_rows,
                rotation: self.rotation,
            },
        );
        self.rotation = self.rotation.wrapping_add(1);
        let ran = self.run_calls(plan, &calls, cmd_rx);
        // Prefill speed over the prompt calls' own time; decode speed (per sequence: one token
        // per step) only from whole steps without prompt work, as in the other modes (a step
        // cut between its calls of decodes did not advance every sequence).
        if ran.prefill_tokens > 0 {
            self.update_speed(ran.prefill_tokens, ran.prefill_secs);
        } else if ran.decode_secs > 0.0 && !ran.cut {
            self.update_speed(0, ran.decode_secs);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::batcher::Entry;
    use super::super::sequential::{Decodes, calls};

    fn together(max_rows: usize, rotation: usize) -> Decodes {
        Decodes::Together { max_rows, rotation }
    }

    fn entry(slot: usize, pos: u32, n: usize, sample: bool) -> Entry {
        Entry {
            slot,
            seq_id: slot as i32,
            pos,
            tokens: vec![7; n],
            sample,
        }
    }

    /// A step as the batcher plans it with aligned prefill: an INTERACTIVE prompt first and
    /// whole (slot 4: two chunks and its last token), then every decoding sequence's token
    /// (slots 0, 1, 2), then a BATCH prompt chunk (slot 3).
    fn step() -> Vec<Entry> {
        vec![
            entry(4, 0, 32, false),
            entry(4, 32, 32, false),
            entry(4, 64, 1, true),
            entry(0, 10, 1, true),
            entry(1, 20, 1, true),
            entry(2, 30, 1, true),
            entry(3, 0, 32, false),
        ]
    }

    fn interactive(e: &Entry) -> bool {
        e.slot == 4
    }

    #[test]
    fn grouped_runs_every_decode_in_one_call_and_each_prompt_chunk_alone() {
        let got = calls(&step(), interactive, together(16, 0));
        assert_eq!(
            got,
            vec![vec![0], vec![1], vec![2], vec![3, 4, 5], vec![6]],
            "INTERACTIVE prompt chunks in order (its last token too), then the decodes \
             together, then the BATCH chunk"
        );
    }

    #[test]
    fn grouped_splits_the_decodes_into_calls_of_at_most_max_rows_in_order() {
        let decodes: Vec<Entry> = (0..5).map(|s| entry(s, 40, 1, true)).collect();
        assert_eq!(
            calls(&decodes, |_| false, together(2, 0)),
            vec![vec![0, 1], vec![2, 3], vec![4]]
        );
        // One row a call is sequential's order without the rotation.
        assert_eq!(
            calls(&decodes, |_| false, together(1, 0)),
            (0..5).map(|i| vec![i]).collect::<Vec<_>>()
        );
        // Exactly max_rows: one call.
        assert_eq!(
            calls(&decodes, |_| false, together(5, 0)),
            vec![(0..5).collect::<Vec<_>>()]
        );
        // Within a step: INTERACTIVE prompt chunks, the decodes two by two, the BATCH chunk.
        assert_eq!(
            calls(&step(), interactive, together(2, 0)),
            vec![vec![0], vec![1], vec![2], vec![3, 4], vec![5], vec![6]]
        );
    }

    #[test]
    fn grouped_rotates_its_calls_of_decodes_from_step_to_step() {
        // A step cut short after its first call of decodes must not postpone the same
        // sequences every time: the round of calls starts one call later each step.
        let decodes: Vec<Entry> = (0..5).map(|s| entry(s, 40, 1, true)).collect();
        let at = |rotation| calls(&decodes, |_| false, together(2, rotation));
        assert_eq!(at(1), vec![vec![2, 3], vec![4], vec![0, 1]]);
        assert_eq!(at(2), vec![vec![4], vec![0, 1], vec![2, 3]]);
        assert_eq!(at(3), at(0));
        // INTERACTIVE prompt chunks still come first and the BATCH chunk last.
        assert_eq!(
            calls(&step(), interactive, together(2, 1)),
            vec![vec![0], vec![1], vec![2], vec![5], vec![3, 4], vec![6]]
        );
    }

    #[test]
    fn sequential_runs_every_entry_alone_and_rotates_the_decodes() {
        let got = calls(&step(), interactive, Decodes::Each { rotation: 4 });
        assert_eq!(got, [0, 1, 2, 4, 5, 3, 6].map(|i| vec![i]));
    }

    #[test]
    fn a_prompts_last_token_keeps_its_place_after_its_chunks() {
        // A BATCH prompt's partial chunk and its last token in one step (prefix reuse ended
        // mid-chunk): the token is prompt work of that sequence, not a decode to group.
        let entries = vec![
            entry(0, 5, 1, true),
            entry(1, 20, 12, false),
            entry(1, 32, 1, true),
        ];
        let got = calls(&entries, |_| false, together(16, 0));
        assert_eq!(got, vec![vec![0], vec![1], vec![2]]);
        // Decodes only: one call.
        let decodes: Vec<Entry> = (0..8).map(|s| entry(s, 40, 1, true)).collect();
        assert_eq!(
            calls(&decodes, |_| false, together(16, 0)),
            vec![(0..8).collect::<Vec<_>>()]
        );
        assert!(calls(&[], |_| false, together(16, 0)).is_empty());
    }
}
