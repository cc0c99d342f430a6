//! The engine seam: async code submits [`Job`]s and receives [`Event`]s; one OS thread owns
//! llama.cpp (`thread.rs`, with loading in `load.rs`, device memory in `devices.rs` and token
//! choice in `sampler.rs`) and runs the continuous-batching loop planned by `batcher.rs`.

pub mod batcher;
mod devices;
pub mod events;
mod fingerprint;
mod load;
mod sampler;
pub mod text;
mod thread;
mod tokenizer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_common::offload::OffloadProfile;
use moe_common::plan::MemoryPlan;
use moe_common::registry::{DeviceInfo, ModelInfo};
use tokio::sync::{mpsc, oneshot, watch};

pub use events::{EventReceiver, EventSender, job_channel};
pub use tokenizer::{PreparedPrompt, SpecialTokens, Tokenizer};

/// How to load the model and size the batch.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Name requests use; defaults to the GGUF `general.name` or the file stem.
    pub model_name: Option<String>,
    pub offload: OffloadProfile,
    /// Accelerator budget for `auto` (bytes).
    pub vram_budget: Option<u64>,
    /// Layers on the accelerator; None means all.
    pub gpu_layers: Option<u32>,
    /// KV cache cells of the running sequences, all together (`--ctx-size`).
    pub ctx_size: u32,
    /// Sequences decoded together.
    pub parallel: u32,
    /// KV streams beyond `parallel` that only hold idle cached sequences, each with a running
    /// sequence's share of cells (`--cache-sequences`; per-sequence streams only).
    pub cache_sequences: u32,
    pub threads: Option<u32>,
    /// Tokens per engine step (llama `n_batch`).
    pub batch_size: u32,
    /// Tokens per llama.cpp micro-batch (`n_ubatch`, at most `batch_size`; `--ubatch-size`).
    pub ubatch_size: u32,
    /// One KV cache shared by all sequences. When false (the default), each sequence has its own
    /// KV stream of `ctx_size / parallel` cells, at the same positions as when it runs alone, so
    /// greedy output does not depend on the batch (see docs/benchmarks/batch-invariance.md).
    pub kv_unified: bool,
    /// Element types of the K and V caches (`--cache-type-k`, `--cache-type-v`).
    pub cache_type_k: moe_common::plan::KvCacheType,
    pub cache_type_v: moe_common::plan::KvCacheType,
    /// Whether each sequence is decoded in its own llama.cpp call (batch-invariant on GPU
    /// backends, whose kernels depend on the batch shape), all in one batch per step, or
    /// prompts one per call and decodes all together with row-invariant kernels (`grouped`).
    pub decode_mode: DecodeMode,
    /// `grouped`: a step's decodes run in calls of at most this many sequences (`--grouped-rows`,
    /// at least 1), with the INTERACTIVE cut checked between them.
    pub grouped_rows: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
}

/// How decode steps call llama.cpp (`--decode-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DecodeMode {
    /// On a worker with an accelerator (even at `--gpu-layers 0`): grouped where that is
    /// batch-invariant (moe-cluster's CUDA patch; with routed experts in host memory also its
    /// CPU patch in an AVX2 ggml-cpu), else sequential; batched on the CPU.
    #[default]
    Auto,
    /// One llama.cpp call per sequence, prompts prefilled in chunks at fixed boundaries: greedy
    /// output does not depend on other traffic or on the prefix cache, on any backend.
    Sequential,
    /// One llama.cpp call per step for all sequences: faster; not batch-invariant (GPU kernels
    /// are chosen by batch shape, and ggml-cpu multiplies one row and several differently).
    Batched,
    /// Prompt chunks prefilled one sequence per call at fixed boundaries, as `Sequential`, and
    /// the decoding sequences' next tokens together in calls of up to `--grouped-rows`, as
    /// `Batched`: batch-invariant where the kernels compute each row of such a call as they
    /// would alone (the CPU, and CUDA with moe-cluster's llama.cpp patch, switched on at
    /// start-up, when no routed expert runs on the host's multi-row CPU kernels).
    Grouped,
}

impl DecodeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeMode::Auto => "auto",
            DecodeMode::Sequential => "sequential",
            DecodeMode::Batched => "batched",
            DecodeMode::Grouped => "grouped",
        }
    }
}

/// What the loaded model and context look like; fixed after start-up.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The model as the advert describes it (name requests use, architecture, experts, size).
    pub info: ModelInfo,
    /// Identity of the model file (vocabulary, special tokens, weights); see `fingerprint.rs`.
    pub fingerprint: String,
    pub profile: OffloadProfile,
    /// The placement actually loaded (for `auto`, the one the planner chose).
    pub plan: MemoryPlan,
    /// Devices at start-up, with measured weight and compute bytes; live free memory is in
    /// [`EngineStats::devices`].
    pub devices: Vec<DeviceInfo>,
    /// KV cells of the running sequences, all together (cache-only streams not included).
    pub context_tokens: u32,
    /// KV cells one sequence may use: `context_tokens`, or its share with per-sequence streams.
    pub sequence_tokens: u32,
    /// Attention window of the model's sliding-window layers (GGUF
    /// `<arch>.attention.sliding_window`); 0 when it has none.
    pub sliding_window: u32,
    pub max_sequences: u32,
    pub has_accelerator: bool,
    /// The decode mode in force: `Sequential`, `Grouped` or `Batched` (`Auto` resolved at load).
    pub decode_mode: DecodeMode,
    /// Whether greedy or seeded output does not depend on what else runs (per-sequence KV
    /// streams, and sequential decode or grouped decode with row-invariant kernels): the advert's
    /// `batch_invariant`, and what requests with `batch_invariant` set need.
    pub batch_invariant: bool,
    /// The final message's `system_fingerprint`: a hash of what determines the output (model
    /// fingerprint, decode mode, batch invariance, placement, devices, version).
    pub system_fingerprint: String,
    /// KV streams beyond `max_sequences` that hold only idle cached sequences.
    pub cache_sequences: u32,
    /// Whether the experts kept on the host live in pinned memory.
    pub host_experts_pinned: bool,
    /// The row-invariant kernels `grouped` decodes with (CUDA's, the CPU's or both), switched per
    /// call by the engine.
    invariant_kernels: Option<devices::InvariantKernels>,
    /// Element types of the K and V caches.
    pub cache_type_k: moe_common::plan::KvCacheType,
    pub cache_type_v: moe_common::plan::KvCacheType,
}

/// Scheduling class of a job: interactive work is admitted and prefilled first.
pub use moe_common::LatencyClass;
/// The old name, kept until `metrics.rs` imports [`LatencyClass`] directly.
pub use moe_common::LatencyClass as Class;

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    /// A chat rendered with the model's chat template (`crate::chat`).
    Chat(Box<crate::chat::ChatJob>),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub seed: Option<u64>,
    /// OpenAI's penalties on tokens generated so far, -2..2; 0 is off.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Return each token's log-probability with this many alternatives (None: off).
    pub logprobs: Option<u32>,
}

/// Log-probability of one generated token (over the model's logits), with the most likely
/// alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// (token, bytes, logprob), most likely first.
    pub top: Vec<(u32, Vec<u8>, f32)>,
}

/// One generation request as the engine sees it.
#[derive(Debug)]
pub struct Job {
    /// The prompt as tokens ([`Tokenizer::prepare`], off the engine thread).
    pub prompt: PreparedPrompt,
    /// Tokens generated earlier for this request by another worker (migration).
    pub resume_tokens: Vec<u32>,
    pub max_tokens: u32,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub class: LatencyClass,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// Where the engine streams this job's events ([`job_channel`], sized for the job so a send
    /// never waits); closing it cancels the job.
    pub events: EventSender,
    /// The request's span on this worker: the engine's queue, prefill and decode spans are its
    /// children, and each engine step links to the spans of the sequences it served.
    pub span: tracing::Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End-of-generation token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cancelled by the worker (drain, deadline).
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub finish: Finish,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub queue: Duration,
    pub time_to_first_token: Duration,
    pub decode_tokens_per_second: f64,
}

#[derive(Debug)]
pub enum Event {
    /// Newly released text and exactly the tokens whose bytes it (with the text released before)
    /// wholly contains: ids of text held back (a split character, a possible stop string) come
    /// with that text later, so a replay of the ids received ends on a clean boundary.
    Delta {
        text: String,
        token_ids: Vec<u32>,
        /// With `Sampling::logprobs`: one entry per id of `token_ids`; otherwise empty.
        logprobs: Vec<TokenLogprob>,
    },
    /// Chat jobs only, before any text: how to read the reply (`crate::chat::ReplyShaper`).
    Chat(crate::chat::ChatReply),
    /// The job ended normally; no event follows.
    Done(Summary),
    /// The job failed; no event follows.
    Failed(EngineError),
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Prompt plus `max_tokens` exceeds this worker's context; a larger one may fit.
    #[error("{0}")]
    TooLong(String),
    #[error("deadline exceeded {0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("engine failure: {0}")]
    Internal(String),
    #[error("loading model: {0}")]
    Load(String),
}

/// Live numbers the engine publishes for the advert and metrics (at most every 100 ms).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub active: u32,
    pub queued: u32,
    pub context_tokens: u32,
    pub free_kv_tokens: u32,
    pub max_sequences: u32,
    pub decode_tokens_per_second: f64,
    pub prefill_tokens_per_second: f64,
    /// Jobs stopped early because their receiver went away (client gone).
    pub cancelled_total: u64,
    pub completed_total: u64,
    pub generated_tokens_total: u64,
    /// llama.cpp decode calls made by steps (not the warm-up): per step one with `batched`,
    /// one per sequence with `sequential`, one per prompt chunk plus one for all decodes with
    /// `grouped`.
    pub llama_calls_total: u64,
    /// KV streams moved to keep running sequences' streams consecutive (a sequence, or an idle
    /// stream's cached sequence making way for one), each a copy of the stream's buffers.
    pub stream_moves_total: u64,
    /// The devices with live free memory and this process's bytes per GPU, refreshed by the
    /// engine thread every few seconds.
    pub devices: Vec<DeviceInfo>,
}

/// The token sequences whose KV cells the engine holds right now — idle cached sequences and
/// the prompt (and output so far) of running ones — one entry per KV stream that holds any.
/// Published by the engine thread whenever it changes; the worker's `WatchPrefixCache` RPC
/// turns it into block-hash events (`moe_common::prefix`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrefixCacheView {
    pub sequences: Vec<Arc<[u32]>>,
}

/// Cloneable handle async code uses to reach the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Command>,
    stats: watch::Receiver<EngineStats>,
    prefix_cache: watch::Receiver<Arc<PrefixCacheView>>,
    model: Arc<LoadedModel>,
    tokenizer: Tokenizer,
    /// The engine thread, joined by `shutdown` so that the context and model are freed (and the
    /// GPU idle) before the process exits: CUDA aborts a kernel still running at exit.
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

pub(crate) enum Command {
    /// Boxed: a job is much larger than the other commands.
    Submit(Box<Job>),
    /// Cancel every job still running or queued, then stop the thread.
    Shutdown,
}

/// Loads the model on a dedicated thread and starts the engine loop there.
pub async fn start(config: EngineConfig) -> Result<EngineHandle, EngineError> {
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (stats_tx, stats_rx) = watch::channel(EngineStats::default());
    let (cache_tx, cache_rx) = watch::channel(Arc::new(PrefixCacheView::default()));
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("moe-engine".into())
        .spawn(move || thread::engine_thread(config, cmd_rx, stats_tx, cache_tx, ready_tx))
        .map_err(|e| EngineError::Load(format!("spawning engine thread: {e}")))?;
    let (model, tokenizer) = ready_rx
        .await
        .map_err(|_| EngineError::Load("engine thread died while loading".into()))??;
    Ok(EngineHandle {
        jobs: cmd_tx,
        stats: stats_rx,
        prefix_cache: cache_rx,
        model: Arc::new(model),
        tokenizer,
        thread: Arc::new(std::sync::Mutex::new(Some(thread))),
    })
}

impl EngineHandle {
    /// Hands a job to the engine. Fails fast with UNAVAILABLE when the engine has stopped.
    pub async fn submit(&self, job: Job) -> Result<(), EngineError> {
        self.jobs
            .send(Command::Submit(Box::new(job)))
            .await
            .map_err(|_| EngineError::Unavailable("engine stopped".into()))
    }

    pub fn stats(&self) -> watch::Receiver<EngineStats> {
        self.stats.clone()
    }

    /// What the KV cache holds, updated by the engine thread on every change.
    pub fn prefix_cache(&self) -> watch::Receiver<Arc<PrefixCacheView>> {
        self.prefix_cache.clone()
    }

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The model's tokenizer, for use off the engine thread.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Cancels all remaining jobs, stops the engine thread and waits until it has freed the
    /// context (the model's weights go with the last tokenizer handle).
    pub async fn shutdown(&self) {
        let _ = self.jobs.send(Command::Shutdown).await;
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
