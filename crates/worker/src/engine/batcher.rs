//! Continuous batching as a pure state machine: requests are queued, admitted between steps
//! when a sequence slot and their whole KV reservation (prompt + max_tokens) are free, and each
//! step is planned as one batch holding the next token of every decoding sequence plus prompt
//! chunks of newly admitted ones under a token budget. Interactive work is admitted and
//! prefilled before batch work. A finished sequence leaves its KV cells in place as a prefix
//! cache, and a new request never destroys a longer cached history to reuse a shorter shared
//! prefix: it takes the idle stream whose whole cached sequence begins its prompt, else an empty
//! stream, else the least recently used one, and has the longest useful shared prefix (a system
//! prompt) copied there from another stream. `cache_streams` streams more than decode slots keep
//! more conversations cached. In the aligned mode (`--decode-mode sequential` or `grouped`)
//! prompts are prefilled in chunks at fixed boundaries and only cells computed by whole chunks
//! are reused, so a warm run computes the same shapes as a cold one. Cached cells are evicted
//! (least recently used first) only when an admission needs the room. With per-sequence streams
//! and calls of several sequences, running sequences are moved to keep their streams
//! consecutive (`compact_streams`). No llama.cpp here: the
//! engine thread executes the plans. Admission and step planning live here, the prefix cache
//! (slot choice, reuse, copies, what is published) in `cache`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_common::LatencyClass;

mod cache;

use cache::{Cached, Choice};
pub use cache::{MIN_COPY_TOKENS, reuse_allowed};

#[derive(Clone, Debug)]
pub struct BatcherConfig {
    /// Sequences running at once (`--parallel`).
    pub max_sequences: u32,
    /// KV streams beyond `max_sequences` (`--cache-sequences`; llama `n_seq_max` is the sum):
    /// they hold idle cached sequences, so more conversations than decode slots keep their
    /// history. Only with per-sequence streams (`slot_kv_tokens`).
    pub cache_streams: u32,
    /// KV cells of the context, all slots together (llama `n_ctx`).
    pub kv_tokens: u32,
    /// KV cells each slot has to itself when every sequence has its own KV stream (llama
    /// `kv_unified = false`): a request must fit its slot, a slot's prefix cache competes with
    /// nobody, and a slot is reserved whole. None: one pool of `kv_tokens` shared by all slots.
    pub slot_kv_tokens: Option<u32>,
    /// Tokens one step may decode (llama `n_batch`): decodes plus prefill chunks.
    pub step_tokens: u32,
    /// Sequential decode's exact mode: prompts are prefilled in chunks ending at multiples of
    /// this many tokens (whatever the step budget and other traffic), and prefix reuse (in place
    /// or copied) covers only cells computed by such whole chunks, rounded down to a multiple.
    /// None: chunks fill the step budget and any cached prefix is reused. llama.cpp splits each
    /// chunk into micro-batches of `--ubatch-size` from the chunk's start, so with chunks
    /// starting at multiples of this size the micro-batch boundaries are fixed positions too,
    /// whether or not the micro-batch divides the chunk.
    pub aligned_prefill: Option<u32>,
    /// While interactive sequences are decoding, batch prefill takes at most this many tokens of
    /// a step, so a long batch prompt never slows an interactive stream by more than a small step.
    pub batch_prefill_tokens_under_interactive: u32,
    /// Sequence slots, and their share of the KV cache, that BATCH work may not take: an
    /// INTERACTIVE request arriving while batch streams fill the worker is admitted at the next
    /// step instead of waiting for a batch stream to finish.
    pub interactive_reserved_sequences: u32,
    /// Requests waiting for admission at most; more are refused at once.
    pub max_queue: usize,
    /// How long a request may wait for admission before it is refused.
    pub queue_timeout: Duration,
    /// Keep the running sequences' KV streams consecutive (`Plan::moves`). With per-sequence
    /// streams llama.cpp puts only consecutive sequence ids in one micro-batch, so a call whose
    /// sequences are scattered over the streams (ids 0, 2, 4, 6) is computed as that many
    /// graphs, each reading the weights again. For calls of several sequences (`grouped`,
    /// `batched`) with per-sequence streams; `sequential` has one sequence per call.
    pub compact_streams: bool,
}

/// A request waiting for admission.
#[derive(Debug)]
pub struct Pending<T> {
    /// Prompt tokens (including any resumed tokens) to prefill.
    pub tokens: Vec<u32>,
    pub max_tokens: u32,
    pub class: LatencyClass,
    pub enqueued: Instant,
    pub payload: T,
}

impl<T> Pending<T> {
    /// KV cells the request needs: prompt + max_tokens.
    fn reservation(&self) -> u32 {
        self.tokens.len() as u32 + self.max_tokens
    }
}

/// An admitted sequence occupying a slot.
#[derive(Debug)]
pub struct Seq<T> {
    pub seq_id: i32,
    pub class: LatencyClass,
    /// Prompt tokens followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    /// The prompt as admitted, shared with the published prefix-cache view.
    prompt: Arc<[u32]>,
    /// Prompt tokens whose KV cells were reused from the slot's prefix cache.
    pub reused: u32,
    /// Leading tokens whose cells were computed by whole aligned prefill chunks (or reused from
    /// such cells); see `BatcherConfig::aligned_prefill`.
    aligned: u32,
    /// Tokens already in the KV cache.
    pub n_past: u32,
    /// Token sampled last and not yet fed back (None while prefilling).
    pub next: Option<u32>,
    pub generated: u32,
    pub max_tokens: u32,
    pub reserved: u32,
    pub enqueued: Instant,
    pub admitted: Instant,
    pub payload: T,
}

impl<T> Seq<T> {
    fn prefilling(&self) -> bool {
        self.next.is_none() && (self.n_past as usize) < self.tokens.len()
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// prompt + max_tokens exceeds the whole KV cache: it can never run.
    TooLong { needed: u32, capacity: u32 },
    /// The admission queue is full.
    QueueFull { limit: usize },
    /// The request waited `queue_timeout` without fitting.
    QueueTimeout { waited: Duration },
}

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub slot: usize,
    pub seq_id: i32,
    /// Position of `tokens[0]`.
    pub pos: u32,
    pub tokens: Vec<u32>,
    /// Whether to sample after this entry's last token.
    pub sample: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub entries: Vec<Entry>,
    /// Slots admitted while planning this step, with the prompt tokens reused from the slot's
    /// cache: the engine must drop the slot's KV cells from that position on.
    pub admitted: Vec<(usize, u32)>,
    /// Idle slots whose cached KV cells the engine must drop to make room.
    pub evicted: Vec<usize>,
    /// Shared prefixes to copy into admitted slots before their first decode (in admission
    /// order, before that slot's entry of `admitted` is prepared).
    pub copies: Vec<PrefixCopy>,
    /// KV streams to move, in order, after the admissions are prepared: copy stream `from`
    /// into stream `to` (whose cells were evicted or moved away before), then drop `from`'s
    /// cells (`BatcherConfig::compact_streams`).
    pub moves: Vec<StreamMove>,
}

/// Move the sequence of KV stream `from` (running, or an idle slot's cached sequence) to the
/// empty stream `to`: llama.cpp copies the whole stream buffer at its next decode, in the
/// order the moves were made, so a stream may be moved away and then receive another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamMove {
    pub from: usize,
    pub to: usize,
}

/// Copy the first `len` cells of stream `src` into stream `dst` (which drops everything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixCopy {
    pub src: usize,
    pub dst: usize,
    pub len: u32,
}

impl Plan {
    pub fn n_tokens(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }
}

pub struct Batcher<T> {
    config: BatcherConfig,
    slots: Vec<Option<Seq<T>>>,
    cache: Vec<Option<Cached>>,
    clock: u64,
    interactive: VecDeque<Pending<T>>,
    batch: VecDeque<Pending<T>>,
    reserved: u32,
    /// Bumped whenever the token sequences the KV streams hold change (see `cached_sequences`).
    version: u64,
}

impl<T> Batcher<T> {
    pub fn new(config: BatcherConfig) -> Self {
        let streams = config.max_sequences + config.cache_streams;
        let slots = (0..streams).map(|_| None).collect();
        let cache = (0..streams).map(|_| None).collect();
        Batcher {
            config,
            slots,
            cache,
            clock: 0,
            interactive: VecDeque::new(),
            batch: VecDeque::new(),
            reserved: 0,
            version: 0,
        }
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.config
    }

    /// Queues a request, or refuses it (returning the request) when it can never fit or the
    /// queue is full.
    pub fn enqueue(&mut self, p: Pending<T>) -> Result<(), (Refusal, Pending<T>)> {
        let needed = p.reservation();
        let capacity = self.sequence_capacity();
        if needed > capacity {
            return Err((Refusal::TooLong { needed, capacity }, p));
        }
        if self.queued() >= self.config.max_queue {
            let limit = self.config.max_queue;
            return Err((Refusal::QueueFull { limit }, p));
        }
        match p.class {
            LatencyClass::Interactive => self.interactive.push_back(p),
            LatencyClass::Batch => self.batch.push_back(p),
        }
        Ok(())
    }

    /// The most KV cells one request may need.
    pub fn sequence_capacity(&self) -> u32 {
        self.config.slot_kv_tokens.unwrap_or(self.config.kv_tokens)
    }

    /// KV cells a request holds once admitted (and claims while queued): what it needs, or its
    /// whole slot when slots have their own cells.
    fn claim(&self, p: &Pending<T>) -> u32 {
        self.config
            .slot_kv_tokens
            .unwrap_or_else(|| p.reservation())
    }

    pub fn queued(&self) -> usize {
        self.interactive.len() + self.batch.len()
    }

    /// INTERACTIVE requests waiting for admission.
    pub fn interactive_queued(&self) -> usize {
        self.interactive.len()
    }

    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn is_idle(&self) -> bool {
        self.active() == 0 && self.queued() == 0
    }

    /// KV cells not reserved by admitted sequences.
    pub fn free_kv_tokens(&self) -> u32 {
        self.config.kv_tokens - self.reserved
    }

    /// KV cells neither reserved by admitted sequences nor claimed by queued requests: what a
    /// gateway may still place here without the request having to wait for memory.
    pub fn unclaimed_kv_tokens(&self) -> u32 {
        let queued: u32 = self
            .interactive
            .iter()
            .chain(&self.batch)
            .map(|p| self.claim(p))
            .sum();
        self.free_kv_tokens().saturating_sub(queued)
    }

    /// Removes queued requests that waited longer than the queue timeout.
    pub fn expire(&mut self, now: Instant) -> Vec<(Refusal, Pending<T>)> {
        let timeout = self.config.queue_timeout;
        let expired = |p: &Pending<T>| now.saturating_duration_since(p.enqueued) >= timeout;
        self.drain_queued(expired)
            .into_iter()
            .map(|p| {
                let waited = now.saturating_duration_since(p.enqueued);
                (Refusal::QueueTimeout { waited }, p)
            })
            .collect()
    }

    /// Removes queued requests matching `pred` (e.g. whose client went away).
    pub fn drain_queued(&mut self, mut pred: impl FnMut(&Pending<T>) -> bool) -> Vec<Pending<T>> {
        let mut out = Vec::new();
        for q in [&mut self.interactive, &mut self.batch] {
            let mut keep = VecDeque::with_capacity(q.len());
            for p in q.drain(..) {
                if pred(&p) {
                    out.push(p);
                } else {
                    keep.push_back(p);
                }
            }
            *q = keep;
        }
        out
    }

    /// Slots whose sequence matches `pred`.
    pub fn slots_where(&self, mut pred: impl FnMut(&Seq<T>) -> bool) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|s| pred(s)).map(|_| i))
            .collect()
    }

    pub fn seq(&self, slot: usize) -> Option<&Seq<T>> {
        self.slots.get(slot)?.as_ref()
    }

    pub fn seq_mut(&mut self, slot: usize) -> Option<&mut Seq<T>> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Admits what fits, then plans the next step.
    pub fn plan(&mut self, now: Instant) -> Plan {
        let mut plan = Plan::default();
        self.admit(now, &mut plan);
        if self.config.compact_streams {
            self.compact(&mut plan);
        }
        let mut budget = self.config.step_tokens as usize;
        let mut entries = Vec::new();
        // 1. Every decoding sequence advances by one token.
        for (slot, seq) in self.slots.iter().enumerate() {
            let Some(seq) = seq else { continue };
            if let Some(token) = seq.next {
                entries.push(Entry {
                    slot,
                    seq_id: seq.seq_id,
                    pos: seq.n_past,
                    tokens: vec![token],
                    sample: true,
                });
            }
        }
        budget = budget.saturating_sub(entries.len());
        let interactive_decoding = self
            .slots
            .iter()
            .flatten()
            .any(|s| s.class == LatencyClass::Interactive && s.next.is_some());
        // 2. Prompt chunks: interactive first, oldest first within a class.
        let mut prefill: Vec<&Seq<T>> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.prefilling())
            .collect();
        prefill.sort_by_key(|s| (s.class == LatencyClass::Batch, s.admitted, s.seq_id));
        let mut batch_budget = if interactive_decoding {
            self.config.batch_prefill_tokens_under_interactive as usize
        } else {
            usize::MAX
        };
        // Aligned prefill (`sequential` and `grouped` decode) runs the step's entries as
        // separate calls one after another (every prompt chunk in its own call; decodes one
        // call each in `sequential`, all in one call in `grouped`), so an INTERACTIVE prompt's
        // chunks go first, all of them in one step: its first token then waits for its own
        // prefill only, not for a round of the other sequences' decodes per chunk.
        let mut first = Vec::new();
        for seq in prefill {
            let remaining = seq.tokens.len() - seq.n_past as usize;
            let interactive = seq.class == LatencyClass::Interactive;
            let cap = if interactive {
                budget
            } else {
                budget.min(batch_budget)
            };
            let take = match self.config.aligned_prefill {
                Some(_) if interactive => remaining,
                // The chunk ends at the next multiple of `c` whatever the budget: a step with
                // any budget left runs it whole (sequential and grouped decode give it its own
                // call).
                Some(c) if cap > 0 => {
                    let c = c.max(1) as usize;
                    remaining.min(c - seq.n_past as usize % c)
                }
                Some(_) => 0,
                None => remaining.min(cap),
            };
            if take == 0 {
                continue;
            }
            let target = if interactive && self.config.aligned_prefill.is_some() {
                &mut first
            } else {
                &mut entries
            };
            // Aligned chunks end at multiples of `c`, one entry each; otherwise one entry.
            let mut pos = seq.n_past as usize;
            let end = pos + take;
            while pos < end {
                let stop = match self.config.aligned_prefill {
                    Some(c) => end.min((pos / c.max(1) as usize + 1) * c.max(1) as usize),
                    None => end,
                };
                target.push(Entry {
                    slot: seq.seq_id as usize,
                    seq_id: seq.seq_id,
                    pos: pos as u32,
                    tokens: seq.tokens[pos..stop].to_vec(),
                    sample: stop == seq.tokens.len(),
                });
                pos = stop;
            }
            budget = budget.saturating_sub(take);
            if !interactive {
                batch_budget -= take.min(batch_budget);
            }
        }
        first.append(&mut entries);
        plan.entries = first;
        plan
    }

    fn admit(&mut self, now: Instant, plan: &mut Plan) {
        loop {
            // Interactive first; batch only while no interactive request is waiting, so a large
            // interactive request is not starved by a stream of small batch ones.
            let queue = if !self.interactive.is_empty() {
                &self.interactive
            } else {
                &self.batch
            };
            let Some(head) = queue.front() else { break };
            let needed = self.claim(head);
            if self.active() >= self.config.max_sequences as usize {
                break;
            }
            let Some(Choice {
                slot,
                mut reused,
                mut copy,
            }) = self.choose_slot(&head.tokens)
            else {
                break;
            };
            // Unreserved cells are free or held by evictable caches: never over-commit.
            if needed > self.config.kv_tokens - self.reserved {
                break;
            }
            if head.class == LatencyClass::Batch && !self.batch_may_take(needed) {
                break;
            }
            // Other slots' caches take room from this one only when all share one pool.
            while self.config.slot_kv_tokens.is_none()
                && needed > self.config.kv_tokens - self.reserved - self.cached_cells(Some(slot))
            {
                // The copy's source goes last; evicting it cancels the copy.
                let src = copy.map(|c| c.src);
                let victim = (0..self.cache.len())
                    .filter(|&i| i != slot && self.cache[i].is_some())
                    .min_by_key(|&i| (Some(i) == src, self.cache[i].as_ref().map(|c| c.used)))
                    .expect("cached cells exist while the sum is positive");
                if Some(victim) == src {
                    copy = None;
                    reused = self.cache[slot]
                        .as_ref()
                        .map_or(0, |c| self.reusable(&c.tokens, c.aligned, &head.tokens));
                }
                self.cache[victim] = None;
                self.version += 1;
                plan.evicted.push(victim);
            }
            let p = if !self.interactive.is_empty() {
                self.interactive.pop_front()
            } else {
                self.batch.pop_front()
            }
            .expect("front checked");
            self.cache[slot] = None;
            self.reserved += needed;
            self.clock += 1;
            self.version += 1;
            if let Some(copy) = copy {
                // A copied prefix (a shared system prompt) counts as used: keep it longest.
                if let Some(c) = self.cache[copy.src].as_mut() {
                    c.used = self.clock;
                }
                plan.copies.push(copy);
            }
            self.slots[slot] = Some(Seq {
                seq_id: slot as i32,
                class: p.class,
                prompt: p.tokens.as_slice().into(),
                tokens: p.tokens,
                reused,
                aligned: reused,
                n_past: reused,
                next: None,
                generated: 0,
                max_tokens: p.max_tokens,
                reserved: needed,
                enqueued: p.enqueued,
                admitted: now,
                payload: p.payload,
            });
            plan.admitted.push((slot, reused));
        }
    }

    /// Moves running sequences so that their streams are consecutive: while there is a gap,
    /// the sequence of the highest running stream moves into the lowest idle stream between
    /// the running ones. A cached sequence held by that idle stream is kept: it moves first to
    /// an idle stream outside the running range (an empty one, else the least recently used,
    /// whose cache goes as the next admission would take it); with none there the gap stays.
    /// Nothing moves in a plan that copies a shared prefix, nor a sequence admitted by it
    /// (`apply_admissions` prepares those by their admitted stream). The moved sequence keeps
    /// its cells' values, so its output is unchanged (each row is computed alone in the
    /// invariant modes).
    fn compact(&mut self, plan: &mut Plan) {
        if !plan.copies.is_empty() {
            return;
        }
        loop {
            let running: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].is_some())
                .collect();
            let (Some(&lo), Some(&hi)) = (running.first(), running.last()) else {
                return;
            };
            if hi - lo + 1 == running.len() || plan.admitted.iter().any(|&(s, _)| s == hi) {
                return;
            }
            let gap = (lo + 1..hi)
                .find(|&i| self.slots[i].is_none())
                .expect("a running range longer than its sequences has an idle stream");
            if self.cache[gap].is_some() {
                let Some(keep) = (0..self.slots.len())
                    .filter(|&i| (i < lo || i > hi) && self.slots[i].is_none())
                    .min_by_key(|&i| (self.cache[i].as_ref().map(|c| c.used), i))
                else {
                    return;
                };
                if self.cache[keep].take().is_some() {
                    plan.evicted.push(keep);
                }
                self.cache[keep] = self.cache[gap].take();
                plan.moves.push(StreamMove {
                    from: gap,
                    to: keep,
                });
            }
            let mut seq = self.slots[hi].take().expect("running");
            seq.seq_id = gap as i32;
            self.slots[gap] = Some(seq);
            plan.moves.push(StreamMove { from: hi, to: gap });
            self.version += 1;
        }
    }

    /// Whether a BATCH request needing `needed` KV cells leaves the interactive reserve free:
    /// `interactive_reserved_sequences` empty slots and their fair share of the KV cache.
    fn batch_may_take(&self, needed: u32) -> bool {
        let reserve = self.config.interactive_reserved_sequences;
        if reserve == 0 {
            return true;
        }
        let free_slots = self.config.max_sequences - self.active() as u32;
        let kv_share =
            reserve as u64 * self.config.kv_tokens as u64 / self.config.max_sequences.max(1) as u64;
        let kv_left = (self.config.kv_tokens - self.reserved) as u64 - needed as u64;
        free_slots > reserve && kv_left >= kv_share
    }

    /// Records that a planned step was decoded: its tokens are now in the KV cache.
    pub fn commit(&mut self, plan: &Plan) {
        let chunk = self.config.aligned_prefill;
        for e in &plan.entries {
            if let Some(seq) = self.slots[e.slot].as_mut() {
                // A whole aligned prefill chunk right after the aligned cells extends them;
                // a partial chunk or a decoded token does not (see `aligned_prefill`).
                let prefill = seq.next.is_none();
                if chunk
                    .is_some_and(|c| prefill && e.tokens.len() as u32 == c && e.pos == seq.aligned)
                {
                    seq.aligned += e.tokens.len() as u32;
                }
                seq.n_past += e.tokens.len() as u32;
                seq.next = None;
            }
        }
    }

    /// Records a token sampled for `slot`; it is fed back in the next step.
    /// Returns true when the sequence has reached its `max_tokens`.
    pub fn push_token(&mut self, slot: usize, token: u32) -> bool {
        let seq = self.slots[slot]
            .as_mut()
            .expect("push_token on an empty slot");
        seq.next = Some(token);
        seq.tokens.push(token);
        seq.generated += 1;
        seq.generated >= seq.max_tokens
    }

    /// Frees a slot and its KV reservation, returning the sequence. The cells of the tokens it
    /// decoded stay as the slot's prefix cache.
    pub fn finish(&mut self, slot: usize) -> Option<Seq<T>> {
        let seq = self.slots.get_mut(slot)?.take()?;
        self.reserved -= seq.reserved;
        self.cache[slot] = Some(Cached {
            tokens: seq.tokens[..seq.n_past as usize].into(),
            used: self.clock,
            aligned: seq.aligned.min(seq.n_past),
        });
        self.version += 1;
        Some(seq)
    }
}

#[cfg(test)]
mod tests;
