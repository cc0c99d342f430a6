//! A fake worker for gateway tests: a real `moe.v1.Inference` gRPC server on 127.0.0.1:0 that
//! follows a script instead of running a model. It can stall, fail before or after N tokens,
//! drain (end with CANCELLED), or release tokens on cue. Token ids continue from the request's
//! `resume_token_ids`, so a migrated stream reads 0, 1, 2, ... across workers. Started with
//! [`FakeWorker::start_tokenizing`] it also serves `moe.v1.Worker/Tokenize`, slowly.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use moe_common::pb::v1::inference_server::{Inference, InferenceServer};
use moe_common::pb::v1::worker_server::{Worker, WorkerServer};
use moe_common::pb::{
    FinishReason, GenerateRequest, GenerateResponse, PrefixCacheEvent, TokenizeResponse, Usage,
    WatchPrefixCacheRequest,
};
use moe_common::registry::{
    ADVERT_SCHEMA, Capacity, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed, WorkerAdvert,
    WorkerState,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

/// What the fake worker does with each request.
#[derive(Clone, Debug)]
pub enum Script {
    /// Streams the remaining tokens (up to `max_tokens`), `gap` apart, then STOP.
    Tokens { gap: Duration },
    /// Refuses the call with this status before any token.
    FailBefore(Code),
    /// Streams `tokens` tokens, then ends the stream with this status.
    FailAfter { tokens: u32, code: Code },
    /// Streams `tokens` tokens, then a final CANCELLED message (a draining worker).
    Drain { tokens: u32 },
    /// Accepts the call and never sends anything.
    Stall,
    /// Sends one token each time the test adds a permit to [`FakeWorker::cue`], then STOP.
    OnCue,
}

/// What the fake worker saw, for assertions.
#[derive(Default)]
pub struct Seen {
    /// `resume_token_ids.len()` of every request received.
    pub resumed_from: Mutex<Vec<usize>>,
    /// Streams whose consumer went away before the script finished.
    pub dropped: AtomicUsize,
    /// `Tokenize` calls received ([`FakeWorker::start_tokenizing`]).
    pub tokenized: AtomicUsize,
}

#[derive(Clone)]
struct Service {
    script: Script,
    cue: Arc<Semaphore>,
    seen: Arc<Seen>,
    /// What the final message says of the worker's batch invariance.
    batch_invariant: bool,
}

/// Counts a stream as dropped unless disarmed (the script ran to its end).
struct DropGuard {
    seen: Arc<Seen>,
    armed: bool,
}

impl DropGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if self.armed {
            self.seen.dropped.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

fn token(id: u32) -> GenerateResponse {
    GenerateResponse {
        text: format!("t{id} "),
        token_ids: vec![id],
        ..Default::default()
    }
}

fn last(finish: FinishReason, completion_tokens: u32, batch_invariant: bool) -> GenerateResponse {
    GenerateResponse {
        finish_reason: finish as i32,
        usage: Some(Usage {
            completion_tokens,
            ..Default::default()
        }),
        batch_invariant,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Inference for Service {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let req = request.into_inner();
        let from = req.resume_token_ids.len() as u32;
        self.seen.resumed_from.lock().unwrap().push(from as usize);
        if let Script::FailBefore(code) = self.script {
            return Err(Status::new(code, "fake worker: scripted failure"));
        }
        let script = self.script.clone();
        let cue = self.cue.clone();
        let invariant = self.batch_invariant;
        let mut guard = DropGuard {
            seen: self.seen.clone(),
            armed: true,
        };
        let stream = async_stream::stream! {
            let remaining = req.max_tokens.saturating_sub(from);
            match script {
                Script::Tokens { gap } => {
                    for i in 0..remaining {
                        tokio::time::sleep(gap).await;
                        yield Ok(token(from + i));
                    }
                    guard.disarm();
                    yield Ok(last(FinishReason::Length, remaining, invariant));
                }
                Script::FailAfter { tokens, code } => {
                    for i in 0..tokens.min(remaining) {
                        yield Ok(token(from + i));
                    }
                    guard.disarm();
                    yield Err(Status::new(code, "fake worker: scripted failure mid-stream"));
                }
                Script::Drain { tokens } => {
                    for i in 0..tokens.min(remaining) {
                        yield Ok(token(from + i));
                    }
                    guard.disarm();
                    yield Ok(last(FinishReason::Cancelled, tokens.min(remaining), invariant));
                }
                Script::Stall => {
                    std::future::pending::<()>().await;
                }
                Script::OnCue => {
                    for i in 0..remaining {
                        cue.acquire().await.expect("cue open").forget();
                        yield Ok(token(from + i));
                    }
                    guard.disarm();
                    yield Ok(last(FinishReason::Stop, remaining, invariant));
                }
                Script::FailBefore(_) => unreachable!(),
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// `moe.v1.Worker` answering `Tokenize` after `delay` (a prompt of 4 tokens, no block hashes)
/// and never sending a prefix-cache event.
#[derive(Clone)]
struct Tokenizer {
    delay: Duration,
    seen: Arc<Seen>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<PrefixCacheEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Tokenizer {
    async fn tokenize(
        &self,
        _request: Request<GenerateRequest>,
    ) -> Result<Response<TokenizeResponse>, Status> {
        self.seen.tokenized.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        Ok(Response::new(TokenizeResponse {
            prompt_tokens: 4,
            block_hashes: Vec::new(),
            block_tokens: moe_common::prefix::BLOCK_TOKENS,
            model_fingerprint: String::new(),
        }))
    }

    type WatchPrefixCacheStream = EventStream;

    async fn watch_prefix_cache(
        &self,
        _request: Request<WatchPrefixCacheRequest>,
    ) -> Result<Response<EventStream>, Status> {
        Ok(Response::new(Box::pin(futures::stream::pending())))
    }
}

/// A running fake worker; stops when dropped.
pub struct FakeWorker {
    pub id: String,
    pub endpoint: String,
    /// Permits for [`Script::OnCue`]: one token per permit.
    pub cue: Arc<Semaphore>,
    pub seen: Arc<Seen>,
    /// The advert's `batch_invariant` (None: an advert without the field).
    pub batch_invariant: Option<bool>,
    /// The advert's `system_fingerprint` (None: an advert without the field); set it before
    /// building adverts. The fake's final messages carry none.
    pub system_fingerprint: Option<String>,
    stop: CancellationToken,
}

impl Drop for FakeWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl FakeWorker {
    pub async fn start(id: &str, script: Script) -> FakeWorker {
        FakeWorker::start_with(id, script, None).await
    }

    /// [`FakeWorker::start`] advertising `batch_invariant` (and saying so in final messages).
    pub async fn start_with(id: &str, script: Script, batch_invariant: Option<bool>) -> FakeWorker {
        FakeWorker::serve(id, script, batch_invariant, None).await
    }

    /// [`FakeWorker::start`], also serving `moe.v1.Worker/Tokenize`, which answers after
    /// `delay` (a gateway's slow prompt sizing).
    #[allow(dead_code)] // used by tests/front.rs, not tests/drive.rs
    pub async fn start_tokenizing(id: &str, script: Script, delay: Duration) -> FakeWorker {
        FakeWorker::serve(id, script, None, Some(delay)).await
    }

    async fn serve(
        id: &str,
        script: Script,
        batch_invariant: Option<bool>,
        tokenize_delay: Option<Duration>,
    ) -> FakeWorker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cue = Arc::new(Semaphore::new(0));
        let seen = Arc::new(Seen::default());
        let stop = CancellationToken::new();
        let service = Service {
            script,
            cue: cue.clone(),
            seen: seen.clone(),
            batch_invariant: batch_invariant == Some(true),
        };
        let tokenizer = tokenize_delay.map(|delay| {
            WorkerServer::new(Tokenizer {
                delay,
                seen: seen.clone(),
            })
        });
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(InferenceServer::new(service))
                .add_optional_service(tokenizer)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    s.cancelled_owned(),
                )
                .await;
        });
        FakeWorker {
            id: id.to_string(),
            endpoint: format!("http://{addr}"),
            cue,
            seen,
            batch_invariant,
            system_fingerprint: None,
            stop,
        }
    }

    /// Requests this worker received.
    pub fn calls(&self) -> usize {
        self.seen.resumed_from.lock().unwrap().len()
    }

    /// A ready advert for this worker: `full` (fast pool) or `cpu-moe`.
    pub fn advert(&self, profile: &str) -> WorkerAdvert {
        let n_cpu_moe = if profile == "full" { 0 } else { 24 };
        WorkerAdvert {
            schema: ADVERT_SCHEMA,
            id: self.id.clone(),
            endpoint: self.endpoint.clone(),
            state: WorkerState::Ready,
            model: ModelInfo {
                name: "m".into(),
                n_layer: 24,
                ..Default::default()
            },
            model_fingerprint: String::new(),
            decode_mode: None,
            batch_invariant: self.batch_invariant,
            system_fingerprint: self.system_fingerprint.clone(),
            features: moe_common::registry::Features::all(),
            offload: OffloadInfo {
                mode: profile.into(),
                n_cpu_moe,
                profile: profile.into(),
            },
            devices: vec![],
            memory: MemoryInfo::default(),
            capacity: Capacity {
                context_tokens: 8192,
                free_kv_tokens: 8192,
                max_sequences: 8,
            },
            load: Load::default(),
            speed: Speed {
                decode_tokens_per_second: 100.0,
                prefill_tokens_per_second: 1000.0,
            },
            version: "fake".into(),
            updated_unix_ms: moe_common::unix_ms(),
        }
    }
}
