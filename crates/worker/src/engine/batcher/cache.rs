//! The batcher's prefix cache: what the KV streams hold (an idle stream's `Cached` tokens, a
//! running sequence's cells), how much of a prompt they can stand for (in the aligned mode only
//! whole prefill chunks), which stream an admission takes and which shared prefix is copied
//! there (`choose_slot`), what is published for prefix routing, and the rule by which the
//! engine checks that reused cells are still in llama.cpp's cache (`reuse_allowed`).

use std::sync::Arc;

use super::{Batcher, PrefixCopy};

/// A copy must save at least this many prompt tokens (unless it covers the whole prompt): a
/// cross-stream copy moves the whole stream's KV buffer.
pub const MIN_COPY_TOKENS: u32 = 16;

/// Where an admission goes: its stream, the prompt tokens it reuses, and the copy that brings
/// them there when they come from another stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Choice {
    pub(super) slot: usize,
    pub(super) reused: u32,
    pub(super) copy: Option<PrefixCopy>,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// KV cells an idle slot still holds: the tokens at positions 0..len.
#[derive(Debug)]
pub(super) struct Cached {
    pub(super) tokens: Arc<[u32]>,
    /// Admission counter value when this cache was last used (for LRU eviction).
    pub(super) used: u64,
    /// Leading tokens computed by whole aligned prefill chunks (see `Seq::aligned`).
    pub(super) aligned: u32,
}

impl<T> Batcher<T> {
    /// Cells held by idle slots' caches, except `except`'s.
    pub(super) fn cached_cells(&self, except: Option<usize>) -> u32 {
        self.cache
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except)
            .filter_map(|(_, c)| c.as_ref())
            .map(|c| c.tokens.len() as u32)
            .sum()
    }

    /// Prompt tokens of `tokens` that cells holding `held` (of which the first `aligned` came
    /// from whole aligned chunks) can stand for: their common prefix, at most all but the last
    /// prompt token (whose logits must be computed), in the aligned mode only whole chunks.
    pub(super) fn reusable(&self, held: &[u32], aligned: u32, tokens: &[u32]) -> u32 {
        let lcp = common_prefix(held, tokens).min(tokens.len().saturating_sub(1)) as u32;
        match self.config.aligned_prefill {
            Some(c) => {
                let c = c.max(1);
                lcp.min(aligned) / c * c
            }
            None => lcp,
        }
    }

    /// What stream `i` could give `tokens` (cells of a running sequence or of an idle cache).
    fn offer(&self, i: usize, tokens: &[u32]) -> u32 {
        match (&self.slots[i], &self.cache[i]) {
            (Some(s), _) => self.reusable(&s.tokens[..s.n_past as usize], s.aligned, tokens),
            (None, Some(c)) => self.reusable(&c.tokens, c.aligned, tokens),
            (None, None) => 0,
        }
    }

    /// The stream for `tokens`, never destroying a longer cached history to reuse a shorter
    /// shared prefix: (a) the idle stream whose cached sequence begins the prompt (longest
    /// common prefix; fewer than `MIN_COPY_TOKENS` cached tokens past it may differ, e.g. the
    /// end of a previous answer tokenized differently in the next turn's prompt), else (b) an empty stream, else (c) the least recently used idle stream
    /// (smaller first on a tie). When another stream (running or idle) holds a longer reusable
    /// prefix — by at least `MIN_COPY_TOKENS`, or all of the prompt but its last token (a
    /// repeated prompt) — it is copied there.
    pub(super) fn choose_slot(&self, tokens: &[u32]) -> Option<Choice> {
        let idle = || (0..self.slots.len()).filter(|&i| self.slots[i].is_none());
        let whole = idle()
            .filter_map(|i| {
                let c = self.cache[i].as_ref()?;
                let lcp = common_prefix(&c.tokens, tokens);
                let lost = c.tokens.len() - lcp;
                (lcp > 0 && lost < MIN_COPY_TOKENS as usize).then_some((i, lcp))
            })
            .max_by_key(|&(i, lcp)| (lcp, std::cmp::Reverse(i)))
            .map(|(i, _)| i);
        let empty = || idle().find(|&i| self.cache[i].is_none());
        let lru = || {
            idle().min_by_key(|&i| {
                let c = self.cache[i].as_ref();
                (c.map(|c| c.used), c.map(|c| c.tokens.len()), i)
            })
        };
        let slot = whole.or_else(empty).or_else(lru)?;
        let own = self.offer(slot, tokens);
        let copy = (0..self.slots.len())
            .filter(|&i| i != slot)
            .map(|i| (i, self.offer(i, tokens)))
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)))
            .filter(|&(_, len)| {
                len >= own + MIN_COPY_TOKENS || (len > own && len as usize + 1 >= tokens.len())
            })
            .map(|(src, len)| PrefixCopy {
                src,
                dst: slot,
                len,
            });
        Some(Choice {
            slot,
            reused: copy.map_or(own, |c| c.len),
            copy,
        })
    }

    /// Drops the prefix reuse of a slot admitted by the last `plan` (its cached cells turned out
    /// unusable, e.g. a sliding-window cache no longer holds them): the whole prompt is
    /// prefilled. Plan again afterwards.
    pub fn drop_reuse(&mut self, slot: usize) {
        if let Some(seq) = self.slots[slot].as_mut() {
            seq.reused = 0;
            seq.aligned = 0;
            seq.n_past = 0;
            seq.next = None;
        }
    }

    /// Forgets a slot's prefix cache (its KV cells were dropped).
    pub fn forget(&mut self, slot: usize) {
        if let Some(c) = self.cache.get_mut(slot)
            && c.take().is_some()
        {
            self.version += 1;
        }
    }

    /// Changes whenever [`Batcher::cached_sequences`] may have changed.
    pub fn cache_version(&self) -> u64 {
        self.version
    }

    /// The token sequences whose KV cells the streams hold, one per stream that holds any: an
    /// idle stream's cached tokens, a running sequence's prompt (its cells are being computed).
    pub fn cached_sequences(&self) -> Vec<Arc<[u32]>> {
        self.slots
            .iter()
            .zip(&self.cache)
            .filter_map(|(s, c)| match (s, c) {
                (Some(s), _) => Some(s.prompt.clone()),
                (None, Some(c)) => Some(c.tokens.clone()),
                (None, None) => None,
            })
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// KV cells held by idle slots' prefix caches.
    pub fn cached_tokens(&self) -> u32 {
        self.cached_cells(None)
    }
}

/// Whether a slot whose cache starts at position `pos_min` (-1: empty) may reuse its first
/// `reused` positions: every position before them must be cached, except that sliding-window
/// layers (window `n_swa`, 0 for none) need only the last `n_swa` — llama-server's rule, strict
/// for models without a window.
pub fn reuse_allowed(pos_min: i32, reused: u32, n_swa: u32) -> bool {
    let needed_from = if n_swa > 0 {
        reused.saturating_sub(n_swa)
    } else {
        0
    };
    pos_min >= 0 && pos_min as u32 <= needed_from
}
