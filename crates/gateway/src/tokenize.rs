//! Prompt sizing and prefix hits for placement (issues 16 and 17).
//!
//! Before ranking, the gateway asks one ready worker serving the request's model to tokenize
//! it (`moe.v1.Worker/Tokenize`: the worker's own validation, chat template and tokenizer). The
//! worker is the rendezvous choice of the request's prefix key over the ready workers that
//! advertise `prefix_cache_events` (the ones with the `moe.v1.Worker` service), so the
//! tokenizing load spreads over the fleet. The answer gives
//!
//! - the prompt's real token count, used for the KV demand and the reservation instead of the
//!   bytes/3 estimate (which reserved about 1,000 tokens for a 560-token chat prompt and refused
//!   requests that fit), and
//! - the prompt's block hashes, matched against the prefix index ([`crate::prefix_index`]) to
//!   get the prompt tokens each worker of the same model file holds ([`PrefixHits`]).
//!
//! A failure or a timeout (`--tokenize-timeout`) falls back to the estimate and no prefix term;
//! placement never waits longer than the timeout for it.

use std::sync::Arc;
use std::time::Duration;

use moe_common::pb::GenerateRequest;
use moe_common::pb::v1::worker_client::WorkerClient;
use tonic::Code;

use crate::prefix_index::PrefixIndex;
use crate::router::RoutingState;
use crate::scheduler::affinity::{prefix_key, rendezvous_top, stable_hash};
use crate::scheduler::features::has_prefix_cache_events;
use crate::scheduler::{PrefixHits, estimate_prompt_tokens};

/// How a gateway sizes prompts and finds prefix hits.
#[derive(Clone, Debug, Default)]
pub struct PromptSizing {
    /// The workers' prefix caches; None with `--prefix-routing off`.
    pub index: Option<Arc<PrefixIndex>>,
    /// Longest wait for a worker's `Tokenize`; zero: never tokenize (estimate only).
    pub timeout: Duration,
}

/// A request's size and hits, as placement uses them.
#[derive(Clone, Debug)]
pub struct Sized {
    pub prompt_tokens: u32,
    pub hits: PrefixHits,
    /// "tokenizer" or "estimate" (`moe_prompt_sizing_total`).
    pub source: &'static str,
}

#[derive(Debug, thiserror::Error)]
enum TokenizeError {
    #[error("no ready worker serves the model")]
    NoWorker,
    #[error("{0}")]
    Channel(#[from] crate::router::ChannelError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{code:?}: {message}")]
    Status { code: Code, message: String },
}

struct Tokenized {
    prompt_tokens: u32,
    blocks: Vec<u64>,
    fingerprint: String,
}

impl PromptSizing {
    /// Sizes `req` (never fails: the estimate is the fallback).
    pub async fn size(&self, router: &RoutingState, req: &GenerateRequest) -> Sized {
        let key = prefix_key(req);
        let estimate = || Sized {
            prompt_tokens: estimate_prompt_tokens(req),
            hits: PrefixHits {
                key: key.filter(|_| self.index.is_some()),
                ..PrefixHits::default()
            },
            source: "estimate",
        };
        if self.timeout.is_zero() {
            return estimate();
        }
        match self.tokenize(router, req, key).await {
            Ok(t) => Sized {
                prompt_tokens: t.prompt_tokens,
                hits: match &self.index {
                    Some(index) => index.hits(&t.fingerprint, &t.blocks, t.prompt_tokens, key),
                    None => PrefixHits::default(),
                },
                source: "tokenizer",
            },
            Err(e) => {
                tracing::debug!(error = %e, "tokenizing for placement failed; using the estimate");
                estimate()
            }
        }
    }

    async fn tokenize(
        &self,
        router: &RoutingState,
        req: &GenerateRequest,
        key: Option<u64>,
    ) -> Result<Tokenized, TokenizeError> {
        let snapshot = router.snapshot();
        let ejected = router.ejected();
        let mut ready: Vec<_> = snapshot
            .workers
            .values()
            .filter(|w| {
                w.is_ready()
                    && (req.model.is_empty() || w.model.name == req.model)
                    && !ejected.contains(&w.id)
            })
            .collect();
        // Only workers with the `moe.v1.Worker` service can tokenize (older ones answer
        // UNIMPLEMENTED); in a fleet without any, the attempt fails into the estimate.
        if ready.iter().any(|w| has_prefix_cache_events(w)) {
            ready.retain(|w| has_prefix_cache_events(w));
        }
        ready.sort_by(|a, b| a.id.cmp(&b.id));
        let hashes: Vec<u64> = ready.iter().map(|w| stable_hash(w.id.as_bytes())).collect();
        let i = *rendezvous_top(key.unwrap_or(0), &hashes, 1)
            .first()
            .ok_or(TokenizeError::NoWorker)?;
        let channel = router.channel(&ready[i].endpoint)?;
        let mut client = WorkerClient::new(channel);
        let mut request = tonic::Request::new(req.clone());
        request.set_timeout(self.timeout);
        let reply = tokio::time::timeout(self.timeout, client.tokenize(request))
            .await
            .map_err(|_| TokenizeError::Timeout(self.timeout))?
            .map_err(|s| TokenizeError::Status {
                code: s.code(),
                message: s.message().to_string(),
            })?
            .into_inner();
        if reply.block_tokens != moe_common::prefix::BLOCK_TOKENS {
            // Another block size: the count holds, the hashes cannot match.
            return Ok(Tokenized {
                prompt_tokens: reply.prompt_tokens,
                blocks: Vec::new(),
                fingerprint: reply.model_fingerprint,
            });
        }
        Ok(Tokenized {
            prompt_tokens: reply.prompt_tokens,
            blocks: reply.block_hashes,
            fingerprint: reply.model_fingerprint,
        })
    }
}
