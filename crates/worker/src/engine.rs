//! The engine seam: async code submits [`Job`]s and receives [`Event`]s; one OS thread owns
//! llama.cpp (see `llama.rs`) and runs the continuous-batching loop planned by `batcher.rs`.

pub mod batcher;
mod llama;
mod nvml;
pub mod text;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

pub use llama::{EngineConfig, LoadedModel, refresh_devices, start};

/// Scheduling class of a job inside the worker: interactive work is admitted and prefilled first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Interactive,
    Batch,
}

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Prompt {
    Text(String),
    /// (role, content) pairs rendered with the model's chat template.
    Chat(Vec<(String, String)>),
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
}

/// One generation request as the engine sees it.
#[derive(Debug)]
pub struct Job {
    pub prompt: Prompt,
    /// Tokens generated earlier for this request by another worker (migration).
    pub resume_tokens: Vec<u32>,
    pub max_tokens: u32,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub class: Class,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// Where the engine streams this job's events; closing it cancels the job.
    pub events: mpsc::UnboundedSender<Event>,
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
    /// Newly produced text (whole UTF-8 characters) and the tokens generated since the last event.
    Delta { text: String, token_ids: Vec<u32> },
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
}

/// Cloneable handle async code uses to reach the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Command>,
    stats: watch::Receiver<EngineStats>,
    model: Arc<LoadedModel>,
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

    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Cancels all remaining jobs, stops the engine thread and waits until it has freed the
    /// context and the model.
    pub async fn shutdown(&self) {
        let _ = self.jobs.send(Command::Shutdown).await;
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}
