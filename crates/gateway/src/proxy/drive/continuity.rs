//! Which workers may take a request over from another: once the client has text, only workers
//! serving the same model file (same fingerprint), and after a "too long for this worker"
//! refusal, only workers with more KV cells per sequence. A request with `batch_invariant` set
//! only ever goes to workers advertising `batch_invariant: true`, migrations included (the
//! placement filters them too, `scheduler::features::capable`; this is the last check).

use moe_common::registry::WorkerAdvert;

use crate::scheduler::Ranking;

/// Constraints a request gathers as it moves between workers.
#[derive(Clone, Debug, Default)]
pub(super) struct Continuity {
    /// The model that produced the text the client has; None before the first token.
    model: Option<ModelPin>,
    /// A worker must have more KV cells per sequence than this (the largest share that refused
    /// the request as too long); 0 admits any.
    share_above: u32,
    /// The request's `batch_invariant`: only workers advertising `batch_invariant: true`.
    batch_invariant: bool,
}

/// KV cells one request may use on `worker`: its share of the context, as workers split it by
/// default (per-sequence KV streams; a `--kv-unified` worker may give one request more).
fn sequence_share(worker: &WorkerAdvert) -> u32 {
    worker.capacity.context_tokens / worker.capacity.max_sequences.max(1)
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelPin {
    name: String,
    /// Empty when the worker that produced the first token advertised none (an older worker).
    fingerprint: String,
}

impl Continuity {
    /// The constraints of a request not placed yet; `batch_invariant` is the request's field.
    pub(super) fn new(batch_invariant: bool) -> Self {
        Continuity {
            batch_invariant,
            ..Default::default()
        }
    }

    /// Pins the request to the model of `worker`, which produced the client's first token.
    /// Later calls keep the first pin.
    pub(super) fn pin(&mut self, worker: &WorkerAdvert) {
        self.model.get_or_insert_with(|| ModelPin {
            name: worker.model.name.clone(),
            fingerprint: worker.model_fingerprint.clone(),
        });
    }

    /// `worker` refused the request as too long for its context.
    pub(super) fn refused_too_long(&mut self, worker: &WorkerAdvert) {
        self.share_above = self.share_above.max(sequence_share(worker));
    }

    /// Whether `worker` may continue the request: the same fingerprint as the worker that
    /// produced the first token (the same model name when that worker advertised none), and
    /// more KV cells per sequence than any worker that refused the request as too long, and
    /// batch-invariant when the request asks for it.
    pub(super) fn admits(&self, worker: &WorkerAdvert) -> bool {
        let model = match &self.model {
            None => true,
            Some(pin) if pin.fingerprint.is_empty() => worker.model.name == pin.name,
            Some(pin) => worker.model_fingerprint == pin.fingerprint,
        };
        let invariant = !self.batch_invariant || worker.batch_invariant == Some(true);
        model && invariant && sequence_share(worker) > self.share_above
    }

    /// Drops the candidates that may not continue the request.
    pub(super) fn filter(&self, ranking: &mut Ranking) {
        ranking.candidates.retain(|c| self.admits(&c.worker));
        ranking.fallback.retain(|c| self.admits(&c.worker));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use moe_common::registry::{
        ADVERT_SCHEMA, Capacity, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed, WorkerState,
    };

    use super::*;
    use crate::scheduler::{Candidate, Pool};

    fn worker(id: &str, model: &str, fingerprint: &str, context: u32) -> WorkerAdvert {
        WorkerAdvert {
            schema: ADVERT_SCHEMA,
            id: id.into(),
            endpoint: format!("http://{id}:50061"),
            state: WorkerState::Ready,
            model: ModelInfo {
                name: model.into(),
                ..Default::default()
            },
            model_fingerprint: fingerprint.into(),
            decode_mode: None,
            batch_invariant: None,
            system_fingerprint: None,
            features: moe_common::registry::Features::all(),
            offload: OffloadInfo::default(),
            devices: vec![],
            memory: MemoryInfo::default(),
            capacity: Capacity {
                context_tokens: context,
                free_kv_tokens: context,
                max_sequences: 4,
            },
            load: Load::default(),
            speed: Speed::default(),
            version: "t".into(),
            updated_unix_ms: 0,
        }
    }

    fn candidate(w: WorkerAdvert) -> Candidate {
        Candidate {
            worker: Arc::new(w),
            pool: Pool::Fast,
            score: 0.0,
            spill: false,
        }
    }

    #[test]
    fn before_the_first_token_any_model_may_take_the_request() {
        let c = Continuity::default();
        assert!(c.admits(&worker("a", "qwen", "f1", 4096)));
        assert!(c.admits(&worker("b", "gpt-oss", "f2", 4096)));
    }

    #[test]
    fn after_the_first_token_only_the_same_fingerprint_continues() {
        let mut c = Continuity::default();
        c.pin(&worker("a", "qwen", "f1", 4096));
        assert!(c.admits(&worker("b", "qwen", "f1", 2048)));
        assert!(
            !c.admits(&worker("c", "gpt-oss", "f2", 4096)),
            "another model"
        );
        assert!(
            !c.admits(&worker("d", "qwen", "f3", 4096)),
            "another file under the same name"
        );
        assert!(
            !c.admits(&worker("e", "qwen", "", 4096)),
            "a worker that cannot prove it serves the same file"
        );
        // The first pin holds.
        c.pin(&worker("c", "gpt-oss", "f2", 4096));
        assert!(!c.admits(&worker("c", "gpt-oss", "f2", 4096)));
    }

    #[test]
    fn a_first_token_from_a_worker_without_fingerprint_pins_the_model_name() {
        let mut c = Continuity::default();
        c.pin(&worker("a", "qwen", "", 4096));
        assert!(c.admits(&worker("b", "qwen", "", 4096)));
        assert!(c.admits(&worker("c", "qwen", "f1", 4096)));
        assert!(!c.admits(&worker("d", "gpt-oss", "", 4096)));
    }

    #[test]
    fn too_long_refusals_admit_only_larger_contexts() {
        let mut c = Continuity::default();
        c.refused_too_long(&worker("a", "qwen", "f1", 2048));
        assert!(!c.admits(&worker("b", "qwen", "f1", 2048)));
        assert!(c.admits(&worker("c", "qwen", "f1", 8192)));
        c.refused_too_long(&worker("c", "qwen", "f1", 8192));
        c.refused_too_long(&worker("a", "qwen", "f1", 2048));
        assert!(!c.admits(&worker("c", "qwen", "f1", 8192)));
        assert!(c.admits(&worker("d", "qwen", "f1", 16384)));
    }

    #[test]
    fn too_long_compares_the_share_of_one_sequence_not_the_whole_context() {
        let mut c = Continuity::default();
        let mut refusing = worker("a", "qwen", "f1", 8192);
        refusing.capacity.max_sequences = 16; // 512 cells a sequence
        c.refused_too_long(&refusing);
        let mut fewer_slots = worker("b", "qwen", "f1", 4096);
        fewer_slots.capacity.max_sequences = 2; // 2048 cells a sequence
        assert!(c.admits(&fewer_slots));
        let mut same_share = worker("c", "qwen", "f1", 16384);
        same_share.capacity.max_sequences = 32;
        assert!(!c.admits(&same_share));
    }

    fn with_invariance(mut w: WorkerAdvert, invariant: Option<bool>) -> WorkerAdvert {
        w.batch_invariant = invariant;
        w
    }

    #[test]
    fn a_batch_invariant_stream_migrates_only_to_batch_invariant_workers() {
        let mut c = Continuity::new(true);
        // Before the first token and after it alike.
        for pinned in [false, true] {
            if pinned {
                c.pin(&with_invariance(
                    worker("a", "qwen", "f1", 4096),
                    Some(true),
                ));
            }
            assert!(c.admits(&with_invariance(
                worker("b", "qwen", "f1", 4096),
                Some(true)
            )));
            assert!(
                !c.admits(&with_invariance(
                    worker("c", "qwen", "f1", 4096),
                    Some(false)
                )),
                "a worker that says it is not batch-invariant"
            );
            assert!(
                !c.admits(&with_invariance(worker("d", "qwen", "f1", 4096), None)),
                "a worker older than the advert field: unknown is not invariant"
            );
        }
        let mut r = Ranking {
            candidates: vec![
                candidate(with_invariance(
                    worker("variant", "qwen", "f1", 4096),
                    Some(false),
                )),
                candidate(with_invariance(worker("b", "qwen", "f1", 4096), Some(true))),
            ],
            fallback: vec![candidate(with_invariance(
                worker("old", "qwen", "f1", 4096),
                None,
            ))],
            queued: false,
        };
        c.filter(&mut r);
        let ids: Vec<_> = r.candidates.iter().map(|c| c.worker.id.as_str()).collect();
        assert_eq!(ids, ["b"]);
        assert!(r.fallback.is_empty());
        // Without the field every worker of the model may continue the stream.
        let mut any = Continuity::new(false);
        any.pin(&with_invariance(
            worker("a", "qwen", "f1", 4096),
            Some(true),
        ));
        assert!(any.admits(&with_invariance(
            worker("c", "qwen", "f1", 4096),
            Some(false)
        )));
        assert!(any.admits(&with_invariance(worker("d", "qwen", "f1", 4096), None)));
    }

    #[test]
    fn filter_drops_other_models_from_candidates_and_fallback() {
        let mut c = Continuity::default();
        c.pin(&worker("a", "smollm2", "f1", 4096));
        let mut r = Ranking {
            candidates: vec![
                candidate(worker("tiny", "tiny", "f9", 4096)),
                candidate(worker("b", "smollm2", "f1", 4096)),
            ],
            fallback: vec![
                candidate(worker("tiny2", "tiny", "f9", 4096)),
                candidate(worker("c", "smollm2", "f1", 4096)),
            ],
            queued: false,
        };
        c.filter(&mut r);
        let ids = |l: &[Candidate]| l.iter().map(|c| c.worker.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&r.candidates), ["b"]);
        assert_eq!(ids(&r.fallback), ["c"]);
    }
}
