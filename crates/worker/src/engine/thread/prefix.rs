//! The prefix cache on the engine thread: a plan's evictions, cross-stream prefix copies and
//! trims carried out in llama.cpp's KV cache (checking that reused cells are still held), and
//! the held token sequences published for prefix routing (`PrefixCacheView`).

use std::sync::Arc;
use std::time::Instant;

use super::super::PrefixCacheView;
use super::super::batcher::{Plan, PrefixCopy, reuse_allowed};
use super::Engine;

impl Engine<'_> {
    /// Drops the KV cells the plan evicts and prepares admitted slots: keeps the reused
    /// prefix's cells (when the cache still holds them all) and drops the rest of the slot's
    /// old sequence. Returns true when some slot's reuse was dropped, so the plan is stale.
    pub(super) fn apply_admissions(&mut self, plan: &Plan, now: Instant) -> bool {
        for &slot in &plan.evicted {
            let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        }
        let mut stale = false;
        for &(slot, mut reused) in &plan.admitted {
            let copy = plan.copies.iter().find(|c| c.dst == slot);
            if let Some(&PrefixCopy { src, len, .. }) = copy {
                // The shared prefix comes from another stream: check what it still holds, then
                // copy that stream (a cross-stream copy moves its whole buffer, at the next
                // decode) and keep only the prefix.
                let pos_min = self.ctx.kv_cache_seq_pos_min(src as i32);
                let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
                if reuse_allowed(pos_min, len, self.sliding_window) {
                    let _ = self
                        .ctx
                        .copy_kv_cache_seq(src as i32, slot as i32, None, None);
                } else {
                    tracing::debug!(src, slot, len, pos_min, "shared prefix no longer cached");
                    self.batcher.drop_reuse(slot);
                    reused = 0;
                    stale = true;
                }
            } else if reused > 0 {
                let pos_min = self.ctx.kv_cache_seq_pos_min(slot as i32);
                if !reuse_allowed(pos_min, reused, self.sliding_window) {
                    tracing::debug!(
                        slot,
                        reused,
                        pos_min,
                        "prefix no longer cached; prefilling all"
                    );
                    self.batcher.drop_reuse(slot);
                    reused = 0;
                    stale = true;
                }
            }
            let from = (reused > 0).then_some(reused);
            let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), from, None);
            if let Some(seq) = self.batcher.seq_mut(slot) {
                seq.payload.admitted = Some(now);
                let live = &mut seq.payload;
                live.phase = tracing::info_span!(
                    parent: &live.span,
                    "worker.prefill",
                    cached_tokens = reused
                );
            }
        }
        // Streams moved to keep the running ones consecutive (`Plan::moves`): llama.cpp copies
        // the buffers at the next decode, in this order, before the step's calls read them.
        for m in &plan.moves {
            let _ = self
                .ctx
                .copy_kv_cache_seq(m.from as i32, m.to as i32, None, None);
            let _ = self.ctx.clear_kv_cache_seq(Some(m.from as u32), None, None);
            self.stats.stream_moves_total += 1;
            tracing::debug!(from = m.from, to = m.to, "KV stream moved");
        }
        stale
    }

    /// Publishes the token sequences the KV streams hold, when they changed since last time.
    pub(super) fn publish_cache(&mut self) {
        let version = self.batcher.cache_version();
        if version == self.cache_version {
            return;
        }
        self.cache_version = version;
        let view = PrefixCacheView {
            sequences: self.batcher.cached_sequences(),
        };
        self.cache_tx.send_if_modified(|v| {
            if **v == view {
                false
            } else {
                *v = Arc::new(view);
                true
            }
        });
    }
}
