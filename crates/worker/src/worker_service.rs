//! The worker's `moe.v1.Worker` service, for gateways' prefix-aware routing:
//!
//! - `Tokenize` validates, renders and tokenizes a request exactly as `Generate` does (same
//!   checks, same chat template, same tokenizer, on the blocking pool, never the engine thread)
//!   and returns its real token count and the chained hashes of its whole blocks.
//! - `WatchPrefixCache` streams the block hashes the KV cache holds: a snapshot first, then one
//!   diff per change of the engine's [`PrefixCacheView`]. Sequences sharing a system prompt share
//!   its blocks, so blocks are reference-counted and `removed` lists only blocks no sequence
//!   holds any more.

use std::collections::HashMap;
use std::pin::Pin;

use futures::Stream;
use moe_common::pb::v1::worker_server::Worker;
use moe_common::pb::{
    GenerateRequest, PrefixCacheEvent, TokenizeResponse, WatchPrefixCacheRequest,
};
use moe_common::prefix::{BLOCK_TOKENS, block_hashes};
use moe_common::request::RequestLimits;
use tonic::{Request, Response, Status};

use crate::engine::{EngineHandle, PrefixCacheView};
use crate::service::prepare_request;

pub struct WorkerService {
    engine: EngineHandle,
    limits: RequestLimits,
}

impl WorkerService {
    pub fn new(engine: EngineHandle, limits: RequestLimits) -> Self {
        WorkerService { engine, limits }
    }
}

/// How many sequences hold each block.
pub type BlockCounts = HashMap<u64, u32>;

/// The blocks of every sequence of `view`, counted.
pub fn block_counts(view: &PrefixCacheView) -> BlockCounts {
    let mut counts = BlockCounts::new();
    for seq in &view.sequences {
        for h in block_hashes(seq) {
            *counts.entry(h).or_default() += 1;
        }
    }
    counts
}

/// Blocks held now and not before (`stored`), and held before and by nothing now (`removed`),
/// each sorted.
pub fn diff(before: &BlockCounts, now: &BlockCounts) -> (Vec<u64>, Vec<u64>) {
    let mut stored: Vec<u64> = now
        .keys()
        .filter(|h| !before.contains_key(h))
        .copied()
        .collect();
    let mut removed: Vec<u64> = before
        .keys()
        .filter(|h| !now.contains_key(h))
        .copied()
        .collect();
    stored.sort_unstable();
    removed.sort_unstable();
    (stored, removed)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<PrefixCacheEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn tokenize(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        let req = request.into_inner();
        // Generate's own checks and preparation: a request Tokenize accepts, Generate accepts.
        let (prepared, _) = prepare_request(&self.engine, &self.limits, &req).await?;
        let model = self.engine.model();
        let mut tokens = prepared.tokens;
        tokens.extend_from_slice(&req.resume_token_ids);
        Ok(Response::new(TokenizeResponse {
            prompt_tokens: tokens.len() as u32,
            block_hashes: block_hashes(&tokens),
            block_tokens: BLOCK_TOKENS,
            model_fingerprint: model.fingerprint.clone(),
        }))
    }

    type WatchPrefixCacheStream = EventStream;

    async fn watch_prefix_cache(
        &self,
        _request: Request<WatchPrefixCacheRequest>,
    ) -> Result<Response<Self::WatchPrefixCacheStream>, Status> {
        let mut views = self.engine.prefix_cache();
        let fingerprint = self.engine.model().fingerprint.clone();
        let stream = async_stream::stream! {
            let mut held = block_counts(&views.borrow_and_update());
            let mut stored: Vec<u64> = held.keys().copied().collect();
            stored.sort_unstable();
            yield Ok(PrefixCacheEvent {
                snapshot: true,
                stored,
                removed: Vec::new(),
                block_tokens: BLOCK_TOKENS,
                model_fingerprint: fingerprint.clone(),
            });
            // Ends when the engine stops (the sender drops) or the gateway goes away.
            while views.changed().await.is_ok() {
                let view = views.borrow_and_update().clone();
                let now = block_counts(&view);
                let (stored, removed) = diff(&held, &now);
                held = now;
                if stored.is_empty() && removed.is_empty() {
                    continue;
                }
                yield Ok(PrefixCacheEvent {
                    snapshot: false,
                    stored,
                    removed,
                    block_tokens: BLOCK_TOKENS,
                    model_fingerprint: fingerprint.clone(),
                });
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn view(seqs: &[Vec<u32>]) -> PrefixCacheView {
        PrefixCacheView {
            sequences: seqs.iter().map(|s| Arc::from(s.as_slice())).collect(),
        }
    }

    #[test]
    fn a_block_shared_by_two_sequences_stays_until_neither_holds_it() {
        let system: Vec<u32> = (0..64).collect();
        let a = [system.clone(), vec![1; 32]].concat();
        let b = [system.clone(), vec![2; 32]].concat();
        let both = block_counts(&view(&[a.clone(), b.clone()]));
        assert_eq!(both.len(), 4, "two shared blocks, one own block each");
        let only_b = block_counts(&view(std::slice::from_ref(&b)));
        let (stored, removed) = diff(&both, &only_b);
        assert!(stored.is_empty());
        assert_eq!(
            removed,
            vec![block_hashes(&a)[2]],
            "only a's own block goes"
        );
        let (stored, removed) = diff(&only_b, &BlockCounts::new());
        assert!(stored.is_empty());
        assert_eq!(removed.len(), 3);
    }
}
