//! The placement policy: a pure function of (request, cluster snapshot, this gateway's own
//! in-flight reservations) to ranked candidates. No I/O, no clocks, no globals: the caller
//! passes a random source for tie-breaks.
//!
//! - INTERACTIVE prefers `full`-profile workers and ranks them by predicted time to first token.
//! - BATCH prefers expert-offloaded workers and ranks them by KV headroom.
//! - Spill-over to the other pool follows a per-class [`Spill`] rule.
//! - A worker whose advertised free KV minus reservations made since that advert cannot hold
//!   prompt + max_tokens is never a candidate.
//! - A first placement samples k (4) workers of the preferred pool ([`sampled`], power-of-k
//!   choices, O(k log n)); retries, small pools and samples where nothing fits use the full scan
//!   ([`rank_full`]), whose ties are broken by power-of-two choices on local in-flight streams.
//! - [`affinity`]: prefix affinity (rendezvous hashing of a prompt-prefix key, bounded by load).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use moe_common::LatencyClass;
use moe_common::pb::GenerateRequest;
use moe_common::registry::{ClusterSnapshot, WorkerAdvert};
use rand::Rng;

pub mod affinity;
pub mod features;
pub mod queue;
mod sampled;

pub use sampled::{IndexCache, PoolIndex, RoomIndex, Sampling};

/// Which pool a worker belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// `full` profile: every expert on the GPU.
    Fast,
    /// `cpu-moe` / `n-cpu-moe:N`: experts (partly) in host memory.
    Offload,
}

impl Pool {
    pub fn of(advert: &WorkerAdvert) -> Pool {
        if advert.offload.n_cpu_moe == 0 {
            Pool::Fast
        } else {
            Pool::Offload
        }
    }
}

/// When a class may use the pool it does not prefer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Spill {
    Off,
    On,
    /// Only onto workers whose load ((active + queued) / max_sequences) is below this.
    BelowLoad(f64),
}

impl std::str::FromStr for Spill {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Spill::On),
            "off" => Ok(Spill::Off),
            _ => s
                .strip_prefix("below:")
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(Spill::BelowLoad)
                .ok_or_else(|| {
                    format!("spill must be on, off or below:LOAD (e.g. below:0.5), not {s:?}")
                }),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Policy {
    pub interactive_spill: Spill,
    pub batch_spill: Spill,
    /// Prefill speed assumed for workers that have not measured theirs yet (tokens/s).
    pub default_prefill_tps: f64,
    /// Decode speed assumed likewise (tokens/s per sequence).
    pub default_decode_tps: f64,
    /// Sampled (power-of-k) first placements, or the full scan of every worker.
    pub sampling: Sampling,
    /// The per-pool worker index sampled decisions read (shared by clones of the policy).
    pub index: IndexCache,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interactive_spill: Spill::On,
            batch_spill: Spill::BelowLoad(0.5),
            default_prefill_tps: 500.0,
            default_decode_tps: 20.0,
            sampling: Sampling::default(),
            index: IndexCache::default(),
        }
    }
}

/// What the policy needs to know about a request.
#[derive(Clone, Debug)]
pub struct Demand<'a> {
    /// Empty: any model.
    pub model: &'a str,
    pub class: LatencyClass,
    /// Estimated prompt tokens.
    pub prompt_tokens: u32,
    /// Tokens still to generate.
    pub max_tokens: u32,
    /// Worker features the request needs ([`features`]).
    pub needs: moe_common::registry::Features,
    /// The request's `batch_invariant`: only workers advertising `batch_invariant: true` may
    /// take it ([`features::capable`]).
    pub batch_invariant: bool,
}

impl Demand<'_> {
    pub fn kv_tokens(&self) -> u32 {
        self.prompt_tokens.saturating_add(self.max_tokens)
    }
}

/// What the workers' prefix caches hold of one request (issue 17), from this gateway's prefix
/// index (`crate::prefix_index`): every gateway sees the same cache events, so every gateway
/// computes the same hits. Empty: no prefix term (`--prefix-routing off`, tokenizing failed).
///
/// The workers holding more of the prompt than (nearly) every worker are listed
/// (`cached_tokens`, at most a bound of them: [`crate::prefix_index::PrefixIndex::hits`]); what
/// the others hold (a system prompt every worker has, say) is read from the index when a worker
/// is scored (`shared`), so a prefix every worker holds costs neither a list of every worker
/// nor an evaluation of every worker.
#[derive(Clone, Debug, Default)]
pub struct PrefixHits {
    /// Prompt tokens a worker holds in its KV cache (whole cached blocks × block size, at most
    /// the prompt), for the listed workers of the request's model file: those holding more than
    /// the run of blocks (nearly) every worker holds. These are considered even when sampling
    /// does not draw them.
    pub cached_tokens: HashMap<String, u32>,
    /// The prompt tokens of the workers not listed, when some may hold part of the prompt:
    /// None when every worker holding part of it is listed.
    pub shared: Option<crate::prefix_index::SharedPrefix>,
    /// The request's [`affinity::prefix_key`]: ties go to its rendezvous choice, not to chance.
    pub key: Option<u64>,
}

impl PrefixHits {
    /// Cached prompt tokens on `worker` (0 without a hit).
    pub fn cached(&self, worker: &str) -> u32 {
        match self.cached_tokens.get(worker) {
            Some(&tokens) => tokens,
            None => self.shared.as_ref().map_or(0, |s| s.cached(worker)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cached_tokens.is_empty() && self.shared.is_none() && self.key.is_none()
    }
}

/// KV tokens and streams this gateway has placed on one worker, with when it placed them, so
/// only placements newer than the worker's advert are subtracted from its headroom.
///
/// "Newer" is decided on this gateway's clock alone (review M14): each advert's receipt is
/// recorded ([`Reservations::advert_received`]) and a placement counts until an advert received
/// [`ADVERT_LAG_MS`] after it. Only adverts with no recorded receipt (callers that record none,
/// such as the simulator, whose clocks are one clock) fall back to the advert's own stamp.
///
/// Streams of this gateway that ended after the worker's advert was received, but were placed
/// early enough for that advert to count them, are credited back ([`Reservations::finished`]):
/// a chat's next turn, sent as soon as the previous one ends, would otherwise find the worker
/// holding its history still busy with that previous turn and its KV still claimed.
#[derive(Clone, Debug, Default)]
pub struct Reservations {
    pub by_worker: HashMap<String, Vec<Reservation>>,
    /// The last advert seen from each worker and when this gateway received it.
    pub received: HashMap<String, AdvertReceipt>,
    /// Recently ended streams of this gateway, by worker.
    pub ended: HashMap<String, Vec<Ended>>,
}

/// A stream of this gateway that ended, for [`Reservations::finished_since`].
#[derive(Clone, Copy, Debug)]
pub struct Ended {
    pub kv_tokens: u32,
    pub placed_unix_ms: u64,
    pub ended_unix_ms: u64,
}

/// Ended streams are remembered this long: a worker rewrites its advert on a meaningful change
/// or once a lease TTL (39cdb7d), so an advert can be several seconds old; only ends after its
/// receipt are credited, so keeping more is only memory.
const ENDED_KEEP_MS: u64 = 60_000;

/// What this gateway knows of a worker beyond its advert ([`Reservations::local`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// Advertised free KV, less this gateway's placements since, plus its streams ended since.
    pub free_kv: u32,
    /// This gateway's placements the advert does not count yet.
    pub placed: u32,
    /// This gateway's streams the advert still counts that have ended.
    pub ended: u32,
    /// Those, and also this gateway's streams that ended up to [`ADVERT_LAG_MS`] before the
    /// advert's receipt, placed before that: streams the advert counts if its numbers are as
    /// old as [`Reservations::since`] assumes them to be ([`Reservations::finished_within_lag`]).
    /// Read only by the free-slot test of a hit on a conversation's own history
    /// (`affinity::rank_with_hits`); headroom and scores use `ended`.
    pub ended_within_lag: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct Reservation {
    pub kv_tokens: u32,
    /// When this gateway placed it, on its own clock (the clock receipts are recorded with).
    pub placed_unix_ms: u64,
}

/// When this gateway received a worker's advert (identified by the worker's `updated_unix_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdvertReceipt {
    /// The advert's `updated_unix_ms` (the worker's clock; used only as an identity).
    pub updated_unix_ms: u64,
    /// This gateway's clock when it first saw that advert.
    pub received_unix_ms: u64,
}

/// How much older than its receipt an advert's numbers may be: the worker's write interval
/// (250 ms), the etcd round trip and the watch delivery. A placement counts against a worker
/// until an advert received this long after it.
pub const ADVERT_LAG_MS: u64 = 500;

impl Reservations {
    /// Records that the advert of `worker` stamped `updated_unix_ms` was seen at `now_unix_ms`
    /// (this gateway's clock); a repeat of the advert already recorded changes nothing.
    pub fn advert_received(&mut self, worker: &str, updated_unix_ms: u64, now_unix_ms: u64) {
        match self.received.get_mut(worker) {
            Some(r) if r.updated_unix_ms == updated_unix_ms => {}
            Some(r) => {
                *r = AdvertReceipt {
                    updated_unix_ms,
                    received_unix_ms: now_unix_ms,
                }
            }
            None => {
                self.received.insert(
                    worker.to_string(),
                    AdvertReceipt {
                        updated_unix_ms,
                        received_unix_ms: now_unix_ms,
                    },
                );
            }
        }
    }

    /// Forgets receipts of workers `keep` rejects (gone from the registry).
    pub fn retain_received(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.received.retain(|id, _| keep(id));
    }

    /// Placements newer than the advert of `worker` stamped `advert_ms`: (KV tokens, streams).
    pub fn since(&self, worker: &str, advert_ms: u64) -> (u32, u32) {
        let Some(list) = self.by_worker.get(worker) else {
            return (0, 0);
        };
        // On this gateway's clock when the advert's receipt is known; otherwise on the stamp.
        let cutoff = match self.received.get(worker) {
            Some(r) if r.updated_unix_ms == advert_ms => {
                r.received_unix_ms.saturating_sub(ADVERT_LAG_MS)
            }
            _ => advert_ms,
        };
        let mut kv = 0u32;
        let mut streams = 0u32;
        for r in list {
            if r.placed_unix_ms >= cutoff {
                kv = kv.saturating_add(r.kv_tokens);
                streams += 1;
            }
        }
        (kv, streams)
    }

    fn streams(&self, worker: &str) -> usize {
        self.by_worker.get(worker).map_or(0, Vec::len)
    }

    /// Records that a stream placed on `worker` at `placed_unix_ms` with `kv_tokens` ended at
    /// `now_unix_ms` (this gateway's clock); forgets ends older than a few adverts.
    pub fn finished(
        &mut self,
        worker: &str,
        kv_tokens: u32,
        placed_unix_ms: u64,
        now_unix_ms: u64,
    ) {
        let list = self.ended.entry(worker.to_string()).or_default();
        list.retain(|e| e.ended_unix_ms + ENDED_KEEP_MS >= now_unix_ms);
        list.push(Ended {
            kv_tokens,
            placed_unix_ms,
            ended_unix_ms: now_unix_ms,
        });
        if self.ended.len() > 4 * self.received.len().max(16) {
            self.ended.retain(|_, l| {
                l.retain(|e| e.ended_unix_ms + ENDED_KEEP_MS >= now_unix_ms);
                !l.is_empty()
            });
        }
    }

    /// Streams of this gateway on `worker` that its advert stamped `advert_ms` still counts but
    /// that have ended: (KV tokens, streams). Counted only when the advert was received before
    /// the stream ended (so it cannot reflect the end) and the stream was placed long enough
    /// before the advert for [`Reservations::since`] to assume the advert counts it.
    pub fn finished_since(&self, worker: &str, advert_ms: u64) -> (u32, u32) {
        let Some(list) = self.ended.get(worker) else {
            return (0, 0);
        };
        let (cutoff, received) = match self.received.get(worker) {
            Some(r) if r.updated_unix_ms == advert_ms => (
                r.received_unix_ms.saturating_sub(ADVERT_LAG_MS),
                r.received_unix_ms,
            ),
            _ => (advert_ms, advert_ms),
        };
        let mut kv = 0u32;
        let mut streams = 0u32;
        for e in list {
            if e.placed_unix_ms < cutoff && e.ended_unix_ms > received {
                kv = kv.saturating_add(e.kv_tokens);
                streams += 1;
            }
        }
        (kv, streams)
    }

    /// [`Reservations::finished_since`] with the advert's numbers read as [`ADVERT_LAG_MS`]
    /// older than its receipt, as [`Reservations::since`] reads them for placements: streams
    /// placed before that moment and ended after it. An advert received just after streams
    /// ended (four turns ending in one decode step, the worker's stats and advert written a
    /// moment before) still counts them, and [`Reservations::finished_since`], which credits
    /// only ends after the receipt, does not take them off: the worker looked full to the
    /// conversations' next turns (the chat benchmark). Streams only; the KV stays with the
    /// cautious reading.
    pub fn finished_within_lag(&self, worker: &str, advert_ms: u64) -> u32 {
        let Some(list) = self.ended.get(worker) else {
            return 0;
        };
        let cutoff = match self.received.get(worker) {
            Some(r) if r.updated_unix_ms == advert_ms => {
                r.received_unix_ms.saturating_sub(ADVERT_LAG_MS)
            }
            _ => advert_ms,
        };
        list.iter()
            .filter(|e| e.placed_unix_ms < cutoff && e.ended_unix_ms > cutoff)
            .count() as u32
    }

    /// Free KV and stream counts of `w` as this gateway knows them ([`Local`]).
    ///
    /// Ended streams are credited only when the advert shows no request waiting for admission:
    /// a waiting request takes the freed slot and KV first, and the advert's free KV, clamped at
    /// zero, does not show how much the waiting requests claim beyond it (the simulator counted
    /// thousands of headroom violations before this rule).
    pub fn local(&self, w: &WorkerAdvert) -> Local {
        let (kv, placed) = self.since(&w.id, w.updated_unix_ms);
        let ((ended_kv, ended), ended_within_lag) = if w.load.queued == 0 {
            (
                self.finished_since(&w.id, w.updated_unix_ms),
                self.finished_within_lag(&w.id, w.updated_unix_ms),
            )
        } else {
            ((0, 0), 0)
        };
        let free_kv = w
            .capacity
            .free_kv_tokens
            .saturating_add(ended_kv)
            .saturating_sub(kv)
            .min(w.capacity.context_tokens);
        Local {
            free_kv,
            placed,
            ended,
            ended_within_lag: ended_within_lag.max(ended),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Candidate {
    pub worker: Arc<WorkerAdvert>,
    pub pool: Pool,
    /// Lower is better: predicted TTFT seconds (interactive) or negative free KV (batch).
    pub score: f64,
    /// Placed outside the class's preferred pool.
    pub spill: bool,
}

/// Candidates in order, plus workers usable only as a last resort for retries and migration
/// (the other pool despite the spill rule).
#[derive(Clone, Debug, Default)]
pub struct Ranking {
    pub candidates: Vec<Candidate>,
    pub fallback: Vec<Candidate>,
    /// No worker had headroom: the candidates are where the request waits least ([`queue`]).
    pub queued: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("no worker serves model {0:?}")]
    ModelNotFound(String),
    #[error("no ready worker: {0}")]
    Unavailable(String),
    #[error(
        "max_tokens {max_tokens} does not fit the context of any worker serving the model (largest: {largest} tokens)"
    )]
    TooLarge { max_tokens: u32, largest: u32 },
    #[error("no worker has KV headroom for {needed} tokens ({reason})")]
    NoHeadroom { needed: u32, reason: String },
    #[error(
        "prompt + max_tokens ({needed} tokens) exceed the context of every worker serving the model (largest: {largest} tokens)"
    )]
    PromptTooLong { needed: u32, largest: u32 },
    /// The request has `batch_invariant` set and no worker serving its model advertises
    /// `batch_invariant: true`. The message starts with the field's name.
    #[error(
        "batch_invariant: no worker{model} guarantees batch-invariant output ({workers} worker(s){model} \
         do not: they batch decode steps with layers on a GPU, share one KV cache (--kv-unified), \
         or run a moe-worker older than the advert's batch_invariant); the request is not served \
         elsewhere"
    )]
    NotBatchInvariant {
        /// ` serving model "name"`, or empty for any model.
        model: String,
        workers: usize,
    },
}

fn load(w: &WorkerAdvert) -> f64 {
    (w.load.active + w.load.queued) as f64 / w.capacity.max_sequences.max(1) as f64
}

/// Answer length assumed for streams a worker is running (tokens), at most: the gateway does not
/// see how long they are.
const TYPICAL_ANSWER_TOKENS: f64 = 128.0;

/// Predicted seconds to the first token on `w` for `d`, counting this gateway's recent placements.
///
/// - Speeds are the worker's measured ones; one it has not measured yet (0) is the policy's
///   assumed speed, which the rankings set to the mean measured speed of the worker's pool
///   ([`assumed_speeds`]) rather than an optimistic constant.
/// - This gateway's placements on `w` newer than its advert are prefilling alongside.
/// - Every running sequence adds a little to each step.
/// - A worker with every sequence slot busy starts the request when a slot frees: the running
///   streams are assumed to be as long as this request's answer (at most
///   [`TYPICAL_ANSWER_TOKENS`]) and half done on average, so one slot frees every
///   answer / 2 / slots steps; each request already waiting needs one more.
fn predicted_ttft(w: &WorkerAdvert, d: &Demand, local_streams: u32, policy: &Policy) -> f64 {
    let local = Local {
        placed: local_streams,
        ..Local::default()
    };
    predicted_ttft_local(w, d, &local, policy)
}

/// [`predicted_ttft`] with this gateway's streams on `w` that ended since its advert taken off.
fn predicted_ttft_local(w: &WorkerAdvert, d: &Demand, local: &Local, policy: &Policy) -> f64 {
    let local_streams = local.placed;
    let prefill_tps = if w.speed.prefill_tokens_per_second > 0.0 {
        w.speed.prefill_tokens_per_second
    } else {
        policy.default_prefill_tps
    };
    let decode_tps = if w.speed.decode_tokens_per_second > 0.0 {
        w.speed.decode_tokens_per_second
    } else {
        policy.default_decode_tps
    };
    let busy = (w.load.active + w.load.queued + local_streams).saturating_sub(local.ended) as f64;
    let slots = w.capacity.max_sequences.max(1) as f64;
    let step = 1.0 / decode_tps;
    let answer = f64::from(d.max_tokens.max(1)).min(TYPICAL_ANSWER_TOKENS);
    let wait = if busy >= slots {
        (busy - slots + 1.0) / slots * (answer / 2.0) * step
    } else {
        0.0
    };
    // Prompts this gateway placed on `w` since its advert are most likely still being
    // prefilled, and share the worker's prefill with this one: each is assumed as long as this
    // one's (uncached) prompt. Without this, a burst of first placements saw every worker at
    // the same prefill time and a 1 % tie went to the prefix key, four of eight onto one.
    let prefill = d.prompt_tokens as f64 / prefill_tps * (1.0 + f64::from(local_streams));
    prefill + wait + busy / slots * step
}

/// Whether `w` has measured both its speeds (a worker that just started has measured neither;
/// one that has served only a prompt, no decode yet, has measured prefill only).
fn measured(w: &WorkerAdvert) -> bool {
    w.speed.prefill_tokens_per_second > 0.0 && w.speed.decode_tokens_per_second > 0.0
}

/// Mean measured speeds of `workers` (each speed over the workers that measured it).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpeedMeans {
    prefill: f64,
    prefill_n: u32,
    decode: f64,
    decode_n: u32,
}

impl SpeedMeans {
    pub(crate) fn add(&mut self, w: &WorkerAdvert) {
        if w.speed.prefill_tokens_per_second > 0.0 {
            self.prefill += w.speed.prefill_tokens_per_second;
            self.prefill_n += 1;
        }
        if w.speed.decode_tokens_per_second > 0.0 {
            self.decode += w.speed.decode_tokens_per_second;
            self.decode_n += 1;
        }
    }

    /// `policy` with the speeds it assumes for unmeasured workers replaced by these means
    /// (each where at least one worker measured it): a worker that has measured nothing yet is
    /// not assumed faster than its peers of the same model and pool, which drew requests away
    /// from workers whose measured speed is honest (issue 17: a worker that had served one
    /// short prompt looked 10x slower than two that had served nothing).
    pub(crate) fn assumed(&self, policy: &Policy) -> Policy {
        let mut p = policy.clone();
        if self.prefill_n > 0 {
            p.default_prefill_tps = self.prefill / f64::from(self.prefill_n);
        }
        if self.decode_n > 0 {
            p.default_decode_tps = self.decode / f64::from(self.decode_n);
        }
        p
    }
}

/// [`SpeedMeans::assumed`] per pool (indexed by [`pool_slot`]) over `workers`.
pub(crate) fn assumed_speeds<'a>(
    workers: impl IntoIterator<Item = &'a WorkerAdvert>,
    policy: &Policy,
) -> [Policy; 2] {
    let mut means = [SpeedMeans::default(); 2];
    for w in workers {
        means[pool_slot(Pool::of(w))].add(w);
    }
    [means[0].assumed(policy), means[1].assumed(policy)]
}

/// Index of a pool in per-pool arrays.
pub(crate) fn pool_slot(pool: Pool) -> usize {
    usize::from(pool == Pool::Offload)
}

/// The pool a class prefers.
fn preferred_pool(class: LatencyClass) -> Pool {
    match class {
        LatencyClass::Interactive => Pool::Fast,
        LatencyClass::Batch => Pool::Offload,
    }
}

/// Lower is better: predicted TTFT seconds (interactive; `cached` prompt tokens need no
/// prefill) or negative free KV (batch; hits order batch work in `affinity::rank_with_hits`).
fn score(w: &WorkerAdvert, d: &Demand, local: &Local, cached: u32, policy: &Policy) -> f64 {
    match d.class {
        LatencyClass::Interactive => {
            // Only the tokens `w` does not hold are prefilled.
            let uncached = Demand {
                prompt_tokens: d.prompt_tokens.saturating_sub(cached),
                ..d.clone()
            };
            predicted_ttft_local(w, &uncached, local, policy)
        }
        LatencyClass::Batch => -(local.free_kv as f64),
    }
}

/// Ranks the workers that can take `demand`. `exclude` lists workers already tried. A first
/// placement (nothing excluded) is sampled when the policy says so; a retry sees every worker.
pub fn rank(
    demand: &Demand,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    policy: &Policy,
    rng: &mut impl Rng,
) -> Result<Ranking, ScheduleError> {
    rank_hits(
        demand,
        &PrefixHits::default(),
        snapshot,
        reservations,
        exclude,
        policy,
        rng,
    )
}

/// [`rank`], with interactive scores counting the prompt tokens each worker holds (`hits`).
pub(crate) fn rank_hits(
    demand: &Demand,
    hits: &PrefixHits,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    policy: &Policy,
    rng: &mut impl Rng,
) -> Result<Ranking, ScheduleError> {
    match policy.sampling {
        Sampling::PowerOfK { k, scan_below } if exclude.is_empty() && k > 0 => {
            sampled::rank_sampled(
                demand,
                hits,
                snapshot,
                reservations,
                policy,
                (k, scan_below),
                rng,
            )
        }
        _ => rank_full_hits(demand, hits, snapshot, reservations, exclude, policy, rng),
    }
}

/// Scores every worker and sorts them: the candidates in order, and the fallback list.
pub fn rank_full(
    demand: &Demand,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    policy: &Policy,
    rng: &mut impl Rng,
) -> Result<Ranking, ScheduleError> {
    let none = PrefixHits::default();
    rank_full_hits(demand, &none, snapshot, reservations, exclude, policy, rng)
}

/// [`rank_full`] with prefix hits in the scores.
pub(crate) fn rank_full_hits(
    demand: &Demand,
    hits: &PrefixHits,
    snapshot: &ClusterSnapshot,
    reservations: &Reservations,
    exclude: &HashSet<String>,
    policy: &Policy,
    rng: &mut impl Rng,
) -> Result<Ranking, ScheduleError> {
    let serving: Vec<&Arc<WorkerAdvert>> = snapshot
        .workers
        .values()
        .filter(|w| demand.model.is_empty() || w.model.name == demand.model)
        .collect();
    if serving.is_empty() {
        return Err(if demand.model.is_empty() {
            ScheduleError::Unavailable("no workers are registered".into())
        } else {
            ScheduleError::ModelNotFound(demand.model.to_string())
        });
    }
    let ready: Vec<&Arc<WorkerAdvert>> = serving
        .iter()
        .copied()
        .filter(|w| w.is_ready() && !exclude.contains(&w.id))
        .collect();
    if ready.is_empty() {
        return Err(ScheduleError::Unavailable(format!(
            "{} worker(s) serve the model but none is ready{}",
            serving.len(),
            if exclude.is_empty() {
                ""
            } else {
                " or untried"
            }
        )));
    }
    let largest = ready
        .iter()
        .map(|w| w.capacity.context_tokens)
        .max()
        .unwrap_or(0);
    if demand.max_tokens >= largest {
        return Err(ScheduleError::TooLarge {
            max_tokens: demand.max_tokens,
            largest,
        });
    }
    let needed = demand.kv_tokens();
    let preferred = preferred_pool(demand.class);
    let spill = match demand.class {
        LatencyClass::Interactive => policy.interactive_spill,
        LatencyClass::Batch => policy.batch_spill,
    };
    // Unmeasured workers are scored with their pool's mean measured speeds.
    let assumed = assumed_speeds(ready.iter().map(|w| w.as_ref()), policy);
    let mut ranking = Ranking::default();
    let mut too_small = 0;
    for w in ready {
        let local = reservations.local(w);
        let free = local.free_kv;
        if needed > w.capacity.context_tokens {
            too_small += 1;
            continue;
        }
        if free < needed {
            continue;
        }
        let pool = Pool::of(w);
        let assumed = &assumed[pool_slot(pool)];
        let score = score(w, demand, &local, hits.cached(&w.id), assumed);
        let candidate = Candidate {
            worker: w.clone(),
            pool,
            score,
            spill: pool != preferred,
        };
        let allowed = pool == preferred
            || match spill {
                Spill::On => true,
                Spill::Off => false,
                Spill::BelowLoad(t) => load(w) < t,
            };
        if allowed {
            ranking.candidates.push(candidate);
        } else {
            ranking.fallback.push(candidate);
        }
    }
    for list in [&mut ranking.candidates, &mut ranking.fallback] {
        // Preferred pool first, then by score.
        list.sort_by(|a, b| a.spill.cmp(&b.spill).then(a.score.total_cmp(&b.score)));
        two_choices(list, reservations, rng);
    }
    if ranking.candidates.is_empty() && ranking.fallback.is_empty() {
        let reason = if too_small > 0 {
            format!("{too_small} worker(s) have a context smaller than the request")
        } else {
            "every serving worker's KV cache is reserved".into()
        };
        return Err(ScheduleError::NoHeadroom { needed, reason });
    }
    if ranking.candidates.is_empty() {
        // Nothing allowed by the spill rule: the request still has somewhere to go rather than
        // failing, but only through the fallback list, which the caller may refuse to use.
        tracing::debug!("no candidate in the preferred pool; fallback only");
    }
    Ok(ranking)
}

/// Among the candidates tied with the best score (same pool, within 1 %), samples two at
/// random and puts the one with fewer local in-flight streams first.
fn two_choices(list: &mut [Candidate], reservations: &Reservations, rng: &mut impl Rng) {
    if list.len() < 2 {
        return;
    }
    let best = &list[0];
    let tol = best.score.abs() * 0.01 + 1e-9;
    let tied = list
        .iter()
        .take_while(|c| c.spill == best.spill && (c.score - best.score).abs() <= tol)
        .count();
    if tied < 2 {
        return;
    }
    let a = rng.random_range(0..tied);
    let mut b = rng.random_range(0..tied - 1);
    if b >= a {
        b += 1;
    }
    let pick =
        if reservations.streams(&list[a].worker.id) <= reservations.streams(&list[b].worker.id) {
            a
        } else {
            b
        };
    list.swap(0, pick);
}

/// How a placement went, for `moe_scheduler_decisions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A worker of the pool the class prefers.
    Preferred,
    /// A worker of the other pool, allowed by the class's spill rule.
    Spill,
    /// A retry onto a worker the spill rule would not allow (a slower answer beats none).
    Fallback,
    /// No worker had headroom: sent to wait in the admission queue of the worker where it
    /// should wait least ([`queue`]).
    Queued,
}

impl Decision {
    /// The `decision` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Preferred => "preferred",
            Decision::Spill => "spill",
            Decision::Fallback => "fallback",
            Decision::Queued => "queued",
        }
    }
}

/// The first candidate; on retries, the fallback list too (a slower answer beats none).
pub fn pick(r: Ranking, retry: bool) -> Option<(Candidate, Decision)> {
    let queued = r.queued;
    let first = r.candidates.into_iter().next().map(|c| {
        let d = if queued {
            Decision::Queued
        } else if c.spill {
            Decision::Spill
        } else {
            Decision::Preferred
        };
        (c, d)
    });
    first.or_else(|| {
        if retry {
            r.fallback
                .into_iter()
                .next()
                .map(|c| (c, Decision::Fallback))
        } else {
            None
        }
    })
}

/// Prompt tokens estimated from bytes (about 3 bytes a token errs on the side of reserving).
pub fn estimate_prompt_tokens(req: &GenerateRequest) -> u32 {
    let bytes = req.prompt.len()
        + req
            .messages
            .iter()
            .map(|m| m.content.len() + 16)
            .sum::<usize>();
    (bytes / 3 + 1) as u32
}

#[cfg(test)]
mod tests;
