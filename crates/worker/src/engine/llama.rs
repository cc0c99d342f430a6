//! The only module that touches llama.cpp. One OS thread owns the backend, model and context
//! (`LlamaContext` borrows the model and is not shared across threads) and runs the
//! continuous-batching loop: intake, cancellation, plan, decode, sample, stream.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LlamaBackendDeviceType, list_llama_ggml_backend_devices};
use moe_common::gguf::GgufHeader;
use moe_common::offload::OffloadProfile;
use moe_common::plan::{ACCELERATOR_OVERHEAD_BYTES, MemoryPlan, ModelShape};
use moe_common::registry::{DeviceInfo, DeviceKind};
use tokio::sync::{mpsc, oneshot, watch};

use super::batcher::{Batcher, BatcherConfig, Pending, Refusal};
use super::text::{StopMatcher, Utf8Assembler};
use super::{
    Command, EngineError, EngineHandle, EngineStats, Event, Finish, Job, Prompt, Sampling, Summary,
};

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
    /// KV cache cells shared by all sequences.
    pub ctx_size: u32,
    /// Sequences decoded together.
    pub parallel: u32,
    pub threads: Option<u32>,
    /// Tokens per engine step (llama `n_batch`).
    pub batch_size: u32,
    pub max_queue: usize,
    pub queue_timeout: Duration,
}

/// What the loaded model and context look like; fixed after start-up.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub name: String,
    pub architecture: String,
    pub n_layer: u32,
    pub expert_count: u32,
    pub expert_used_count: u32,
    pub weight_bytes: u64,
    pub profile: OffloadProfile,
    /// The placement actually loaded (for `auto`, the one the planner chose).
    pub plan: MemoryPlan,
    pub devices: Vec<DeviceInfo>,
    pub context_tokens: u32,
    pub max_sequences: u32,
    pub has_accelerator: bool,
    /// Whether the experts kept on the host live in pinned memory.
    pub host_experts_pinned: bool,
}

fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let b = LlamaBackend::init().map_err(|e| EngineError::Load(e.to_string()))?;
    Ok(BACKEND.get_or_init(|| b))
}

/// Loads the model on a dedicated thread and starts the engine loop there.
pub async fn start(config: EngineConfig) -> Result<EngineHandle, EngineError> {
    let (cmd_tx, cmd_rx) = mpsc::channel(1024);
    let (stats_tx, stats_rx) = watch::channel(EngineStats::default());
    let (ready_tx, ready_rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("moe-engine".into())
        .spawn(move || engine_thread(config, cmd_rx, stats_tx, ready_tx))
        .map_err(|e| EngineError::Load(format!("spawning engine thread: {e}")))?;
    let model = ready_rx
        .await
        .map_err(|_| EngineError::Load("engine thread died while loading".into()))??;
    Ok(EngineHandle {
        jobs: cmd_tx,
        stats: stats_rx,
        model: Arc::new(model),
        thread: Arc::new(std::sync::Mutex::new(Some(thread))),
    })
}

/// Model parameters with their override patterns, which llama.cpp reads by pointer: the
/// strings must outlive the load, so they live beside the pinned parameters.
struct ModelParams {
    params: Pin<Box<LlamaModelParams>>,
    _patterns: Vec<CString>,
}

fn model_params(config: &EngineConfig, n_cpu_moe: u32, n_layer: u32) -> ModelParams {
    let gpu_layers = config.gpu_layers.unwrap_or(u32::MAX / 2);
    let experts_on_host = n_cpu_moe > 0;
    let mut params = Box::pin(
        LlamaModelParams::default()
            .with_n_gpu_layers(gpu_layers)
            // Host-resident experts are read on every token: keep them in RAM that the backend
            // can pin, not in a page-cache mapping.
            .with_use_mmap(!experts_on_host),
    );
    let mut patterns = Vec::new();
    if n_cpu_moe >= n_layer && n_layer > 0 {
        params.as_mut().add_cpu_moe_override();
        // The crate's pattern misses fused gate_up experts.
        let fused = CString::new(r"\.ffn_gate_up_(ch|)exps").expect("no NUL");
        params.as_mut().add_cpu_buft_override(&fused);
        patterns.push(fused);
    } else {
        for i in 0..n_cpu_moe {
            let p = CString::new(format!(r"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps"))
                .expect("no NUL");
            params.as_mut().add_cpu_buft_override(&p);
            patterns.push(p);
        }
    }
    ModelParams {
        params,
        _patterns: patterns,
    }
}

fn device_kind(t: LlamaBackendDeviceType) -> DeviceKind {
    match t {
        LlamaBackendDeviceType::Cpu => DeviceKind::Cpu,
        LlamaBackendDeviceType::Gpu => DeviceKind::Gpu,
        LlamaBackendDeviceType::IntegratedGpu => DeviceKind::IntegratedGpu,
        LlamaBackendDeviceType::Accelerator => DeviceKind::Accelerator,
        LlamaBackendDeviceType::Unknown => DeviceKind::Unknown,
    }
}

/// Lists ggml devices with their memory now, attributing planned weight and KV bytes; loading
/// then replaces the planned bytes on accelerators by measured ones (`account`).
pub fn planned_devices(plan: &MemoryPlan) -> Vec<DeviceInfo> {
    let list = list_llama_ggml_backend_devices();
    let has_gpu = list.iter().any(|d| {
        d.device_type != LlamaBackendDeviceType::Cpu
            && d.device_type != LlamaBackendDeviceType::Accelerator
    });
    list.into_iter()
        .filter(|d| d.device_type != LlamaBackendDeviceType::Accelerator)
        .map(|d| {
            let kind = device_kind(d.device_type);
            let (weight_bytes, kv_bytes, compute_bytes) = match (has_gpu, kind) {
                // Without an accelerator everything sits in host memory.
                (false, DeviceKind::Cpu) => (plan.total_weight_bytes, plan.kv_bytes, 0),
                (true, DeviceKind::Cpu) => (plan.host_expert_bytes + plan.host_input_bytes, 0, 0),
                (true, _) if d.index == first_gpu_index() => {
                    (plan.device_weight_bytes, plan.kv_bytes, plan.compute_bytes)
                }
                _ => (0, 0, 0),
            };
            DeviceInfo {
                name: d.name,
                description: d.description,
                kind,
                total_bytes: d.memory_total as u64,
                free_bytes: d.memory_free as u64,
                weight_bytes,
                planned_weight_bytes: weight_bytes,
                kv_bytes,
                compute_bytes,
                ..Default::default()
            }
        })
        .collect()
}

/// Free bytes of every ggml device now, by device name.
fn free_by_device() -> HashMap<String, u64> {
    list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| (d.name, d.memory_free as u64))
        .collect()
}

/// Replaces planned bytes on accelerators by what llama.cpp took from their free memory: weights
/// are what loading the model took, compute buffers what creating and warming up the context
/// took beyond the KV cache. Host memory is shared with everything else on the machine, so host
/// devices keep the planned figures. Call with nothing else allocating on the devices meanwhile.
pub(crate) fn account(
    devices: &mut [DeviceInfo],
    before: &HashMap<String, u64>,
    loaded: &HashMap<String, u64>,
    ready: &HashMap<String, u64>,
) {
    for d in devices.iter_mut().filter(|d| d.kind != DeviceKind::Cpu) {
        let (Some(&b), Some(&l), Some(&r)) =
            (before.get(&d.name), loaded.get(&d.name), ready.get(&d.name))
        else {
            continue;
        };
        d.weight_bytes = b.saturating_sub(l);
        d.compute_bytes = l.saturating_sub(r).saturating_sub(d.kv_bytes);
        d.measured = true;
    }
}

/// Refreshes the devices' total and free memory and this process's usage as the driver sees it.
pub fn refresh_devices(devices: &mut [DeviceInfo]) {
    let now = list_llama_ggml_backend_devices();
    for d in devices.iter_mut() {
        if let Some(n) = now.iter().find(|n| n.name == d.name) {
            d.total_bytes = n.memory_total as u64;
            d.free_bytes = n.memory_free as u64;
        }
        if d.kind == DeviceKind::Cpu {
            continue;
        }
        d.process_bytes = pci_bus_id(&d.name).and_then(|id| super::nvml::process_bytes(&id));
        d.overhead_bytes = d.process_bytes.map_or(0, |p| {
            p.saturating_sub(d.weight_bytes + d.kv_bytes + d.compute_bytes)
        });
    }
}

/// The PCI bus id ggml reports for a device (`0000:c1:00.0`), if any.
fn pci_bus_id(name: &str) -> Option<String> {
    let index = list_llama_ggml_backend_devices()
        .into_iter()
        .find(|d| d.name == name)?
        .index;
    // SAFETY: `index` comes from ggml's own device list, which does not shrink; the props are
    // plain data filled in by ggml, and the id string is owned by the device, which lives as
    // long as the process.
    unsafe {
        let dev = llama_cpp_sys_2::ggml_backend_dev_get(index);
        if dev.is_null() {
            return None;
        }
        let mut props: llama_cpp_sys_2::ggml_backend_dev_props = std::mem::zeroed();
        llama_cpp_sys_2::ggml_backend_dev_get_props(dev, &mut props);
        if props.device_id.is_null() {
            return None;
        }
        Some(
            CStr::from_ptr(props.device_id)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Whether some accelerator offers a pinned host buffer type: llama.cpp then places weights
/// kept on the host without mmap there (its CPU buffer list tries the accelerator's host buffer
/// type before plain RAM), and copies them to the device at full bus speed.
fn accelerator_pins_host_weights() -> bool {
    list_llama_ggml_backend_devices()
        .into_iter()
        .filter(|d| {
            matches!(
                d.device_type,
                LlamaBackendDeviceType::Gpu | LlamaBackendDeviceType::IntegratedGpu
            )
        })
        // SAFETY: as in `pci_bus_id`; the returned pointer is only compared with null.
        .any(|d| unsafe {
            let dev = llama_cpp_sys_2::ggml_backend_dev_get(d.index);
            !dev.is_null() && !llama_cpp_sys_2::ggml_backend_dev_host_buffer_type(dev).is_null()
        })
}

fn first_gpu_index() -> usize {
    list_llama_ggml_backend_devices()
        .iter()
        .find(|d| {
            matches!(
                d.device_type,
                LlamaBackendDeviceType::Gpu | LlamaBackendDeviceType::IntegratedGpu
            )
        })
        .map(|d| d.index)
        .unwrap_or(usize::MAX)
}

fn plan_placement(config: &EngineConfig, shape: &ModelShape) -> Result<MemoryPlan, EngineError> {
    match config.offload {
        OffloadProfile::Auto => {
            let budget = config
                .vram_budget
                .ok_or_else(|| EngineError::Load("--offload auto needs --vram-budget".into()))?;
            shape
                .fit(budget, ACCELERATOR_OVERHEAD_BYTES, config.ctx_size)
                .ok_or_else(|| {
                    EngineError::Load(format!(
                        "model does not fit a VRAM budget of {budget} bytes even with every expert on the host"
                    ))
                })
        }
        profile => Ok(shape.plan(profile.n_cpu_moe(shape.n_layer), config.ctx_size)),
    }
}

fn load(config: &EngineConfig) -> Result<(LlamaModel, LoadedModel), EngineError> {
    let backend = backend()?;
    let header = GgufHeader::open(&config.model_path)
        .map_err(|e| EngineError::Load(format!("{}: {e}", config.model_path.display())))?;
    let shape = ModelShape::from_gguf(&header);
    let plan = plan_placement(config, &shape)?;
    let params = model_params(config, plan.n_cpu_moe, shape.n_layer);
    let model = LlamaModel::load_from_file(backend, &config.model_path, &params.params)
        .map_err(|e| EngineError::Load(format!("{}: {e}", config.model_path.display())))?;
    // The file stem names the model unless the operator says otherwise: GGUF `general.name`
    // values are often long free text, and operators name files deliberately.
    let name = config.model_name.clone().unwrap_or_else(|| {
        config
            .model_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let devices = planned_devices(&plan);
    let has_accelerator =
        backend.supports_gpu_offload() && devices.iter().any(|d| d.kind != DeviceKind::Cpu);
    // Host experts are loaded without mmap (see `model_params`).
    let host_experts_pinned =
        plan.host_expert_bytes > 0 && has_accelerator && accelerator_pins_host_weights();
    let info = LoadedModel {
        name,
        architecture: header.architecture().unwrap_or("unknown").to_string(),
        n_layer: model.n_layer(),
        expert_count: shape.expert_count,
        expert_used_count: shape.expert_used_count,
        weight_bytes: model.size(),
        profile: config.offload,
        plan,
        devices,
        context_tokens: config.ctx_size,
        max_sequences: config.parallel,
        has_accelerator,
        host_experts_pinned,
    };
    Ok((model, info))
}

fn engine_thread(
    config: EngineConfig,
    cmd_rx: mpsc::Receiver<Command>,
    stats_tx: watch::Sender<EngineStats>,
    ready: oneshot::Sender<Result<LoadedModel, EngineError>>,
) {
    if let Err(e) = backend() {
        let _ = ready.send(Err(e));
        return;
    }
    let free_before = free_by_device();
    let (model, mut info) = match load(&config) {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let free_loaded = free_by_device();
    let threads = config
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get() as u32))
        as i32;
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.ctx_size))
        .with_n_batch(config.batch_size)
        .with_n_ubatch(config.batch_size.min(512))
        .with_n_seq_max(config.parallel)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let backend = backend().expect("initialised by load");
    let mut ctx = match model.new_context(backend, ctx_params) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Load(format!("creating context: {e}"))));
            return;
        }
    };
    if let Err(e) = warm_up(&mut ctx, &model) {
        let _ = ready.send(Err(EngineError::Load(format!("warm-up decode: {e}"))));
        return;
    }
    account(
        &mut info.devices,
        &free_before,
        &free_loaded,
        &free_by_device(),
    );
    refresh_devices(&mut info.devices);
    let context_tokens = ctx.n_ctx();
    let info = LoadedModel {
        context_tokens,
        ..info
    };
    tracing::info!(
        model = %info.name, profile = %info.profile, n_cpu_moe = info.plan.n_cpu_moe,
        ctx = context_tokens, parallel = config.parallel, threads, "model loaded"
    );
    let batcher = Batcher::new(BatcherConfig {
        max_sequences: config.parallel,
        kv_tokens: context_tokens,
        step_tokens: config.batch_size,
        batch_prefill_tokens_under_interactive: (config.batch_size / 4).max(config.parallel),
        // One slot in 16 (4 of 64) stays free of batch work for interactive arrivals.
        interactive_reserved_sequences: config.parallel / 16,
        max_queue: config.max_queue,
        queue_timeout: config.queue_timeout,
    });
    let _ = ready.send(Ok(info));
    let mut engine = Engine {
        model: &model,
        ctx,
        batcher,
        batch: LlamaBatch::new(config.batch_size as usize, config.parallel as i32),
        stats: EngineStats {
            context_tokens,
            free_kv_tokens: context_tokens,
            max_sequences: config.parallel,
            ..Default::default()
        },
        stats_tx,
        last_publish: Instant::now(),
    };
    engine.run(cmd_rx);
    tracing::info!("engine stopped");
}

/// Decodes one token and forgets it, as llama-server does at start-up: the first request then
/// pays for no lazy initialisation (cuBLAS handles, CUDA graphs, pools), and the memory those take
/// is in place before the worker accounts its device memory.
fn warm_up(ctx: &mut LlamaContext<'_>, model: &LlamaModel) -> Result<(), String> {
    let mut batch = LlamaBatch::new(1, 1);
    batch
        .add(model.vocab().bos(), 0, &[0], true)
        .map_err(|e| e.to_string())?;
    ctx.decode(&mut batch).map_err(|e| e.to_string())?;
    ctx.clear_kv_cache();
    Ok(())
}

/// Per-sequence state that lives only on the engine thread.
struct Live {
    events: mpsc::UnboundedSender<Event>,
    sampler: LlamaSampler,
    /// The chain is greedy alone: take the arg-max of the logits directly (see `argmax`).
    greedy: bool,
    utf8: Utf8Assembler,
    stops: StopMatcher,
    prompt_tokens: u32,
    deadline: Option<Instant>,
    arrived: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Instant,
    /// The request's span (`worker.request`), which engine steps link to.
    span: tracing::Span,
    /// The span of the phase the sequence is in: `worker.queue`, `worker.prefill`, then
    /// `worker.decode`; replacing it ends the previous phase.
    phase: tracing::Span,
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batcher: Batcher<Live>,
    batch: LlamaBatch<'static>,
    stats: EngineStats,
    stats_tx: watch::Sender<EngineStats>,
    last_publish: Instant,
}

impl<'m> Engine<'m> {
    fn run(&mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        loop {
            if self.batcher.is_idle() {
                self.publish(true);
                match cmd_rx.blocking_recv() {
                    Some(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    None => return,
                }
            }
            loop {
                match cmd_rx.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.cancel_all();
                        return;
                    }
                }
            }
            self.housekeeping(Instant::now());
            if !self.step() {
                // Nothing runnable (requests wait for KV): wait briefly for completions/intake.
                std::thread::sleep(Duration::from_millis(2));
            }
            self.publish(false);
        }
    }

    /// Returns false when the engine must stop.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(job) => {
                self.submit(*job);
                true
            }
            Command::Shutdown => {
                self.cancel_all();
                self.publish(true);
                false
            }
        }
    }

    fn tokenize(&self, job: &Job) -> Result<Vec<u32>, EngineError> {
        let text = match &job.prompt {
            Prompt::Text(t) => t.clone(),
            Prompt::Chat(messages) => {
                let template = self.model.chat_template(None).map_err(|e| {
                    EngineError::InvalidArgument(format!("model has no chat template: {e}"))
                })?;
                let chat = messages
                    .iter()
                    .map(|(r, c)| LlamaChatMessage::new(r.clone(), c.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| EngineError::InvalidArgument(format!("message: {e}")))?;
                self.model
                    .apply_chat_template(&template, &chat, true)
                    .map_err(|e| EngineError::InvalidArgument(format!("chat template: {e}")))?
            }
        };
        let tokens = self.model.vocab().tokenize(text.as_bytes(), true, true);
        if tokens.is_empty() {
            return Err(EngineError::InvalidArgument("prompt has no tokens".into()));
        }
        Ok(tokens.into_iter().map(|t| t.0 as u32).collect())
    }

    fn submit(&mut self, job: Job) {
        let events = job.events.clone();
        let mut tokens = match self.tokenize(&job) {
            Ok(t) => t,
            Err(e) => {
                let _ = events.send(Event::Failed(e));
                return;
            }
        };
        let prompt_tokens = tokens.len() as u32;
        let n_vocab = self.model.n_vocab() as u32;
        if let Some(bad) = job.resume_tokens.iter().find(|&&t| t >= n_vocab) {
            let _ = events.send(Event::Failed(EngineError::InvalidArgument(format!(
                "resume token {bad} is outside the vocabulary ({n_vocab})"
            ))));
            return;
        }
        if job.resume_tokens.len() as u32 >= job.max_tokens {
            let _ = events.send(Event::Failed(EngineError::InvalidArgument(
                "resume_token_ids must be fewer than max_tokens".into(),
            )));
            return;
        }
        let greedy = is_plain_greedy(&job.sampling);
        let mut sampler = build_sampler(&job.sampling, self.model.n_vocab());
        sampler.accept_many(job.resume_tokens.iter().map(|&t| LlamaToken(t as i32)));
        tokens.extend_from_slice(&job.resume_tokens);
        let pending = Pending {
            tokens,
            max_tokens: job.max_tokens - job.resume_tokens.len() as u32,
            class: job.class,
            enqueued: job.arrived,
            payload: Live {
                events: job.events,
                sampler,
                greedy,
                utf8: Utf8Assembler::default(),
                stops: StopMatcher::new(job.stop),
                prompt_tokens,
                deadline: job.deadline,
                arrived: job.arrived,
                admitted: None,
                first_token: None,
                last_token: job.arrived,
                phase: tracing::info_span!(parent: &job.span, "worker.queue"),
                span: job.span,
            },
        };
        if let Err((why, p)) = self.batcher.enqueue(pending) {
            let _ = p.payload.events.send(Event::Failed(refusal_error(why)));
        }
    }

    /// Drops work whose client went away or whose deadline passed; refuses requests that
    /// waited too long for KV.
    fn housekeeping(&mut self, now: Instant) {
        let gone = |l: &Live| l.events.is_closed();
        let late = |l: &Live| l.deadline.is_some_and(|d| d <= now);
        for p in self
            .batcher
            .drain_queued(|p| gone(&p.payload) || late(&p.payload))
        {
            if gone(&p.payload) {
                self.stats.cancelled_total += 1;
            } else {
                let _ = p
                    .payload
                    .events
                    .send(Event::Failed(EngineError::DeadlineExceeded(
                        "while queued".into(),
                    )));
            }
        }
        for (why, p) in self.batcher.expire(now) {
            let _ = p.payload.events.send(Event::Failed(refusal_error(why)));
        }
        for slot in self.batcher.slots_where(|s| gone(&s.payload)) {
            self.stats.cancelled_total += 1;
            self.release(slot);
        }
        for slot in self.batcher.slots_where(|s| late(&s.payload)) {
            self.end(slot, Finish::Cancelled);
        }
    }

    /// Plans and runs one decode step. Returns false when there was nothing to run.
    fn step(&mut self) -> bool {
        let now = Instant::now();
        let plan = self.batcher.plan(now);
        for &slot in &plan.evicted {
            let _ = self.ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
        }
        for &(slot, reused) in &plan.admitted {
            // Keep the reused prefix's cells, drop the rest of the slot's old sequence.
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
        if plan.entries.is_empty() {
            return false;
        }
        // One span per step, linked to the requests whose sequences it advances.
        let step = tracing::info_span!(
            parent: None,
            "engine.step",
            sequences = plan.entries.len(),
            tokens = plan.n_tokens()
        );
        for e in &plan.entries {
            if let Some(seq) = self.batcher.seq_mut(e.slot) {
                step.follows_from(&seq.payload.span);
            }
        }
        let _step = step.enter();
        self.batch.clear();
        let mut sample_at = Vec::new();
        for e in &plan.entries {
            let last = e.tokens.len() - 1;
            for (i, &t) in e.tokens.iter().enumerate() {
                let logits = e.sample && i == last;
                if logits {
                    sample_at.push((e.slot, self.batch.n_tokens()));
                }
                self.batch
                    .add(
                        LlamaToken(t as i32),
                        (e.pos + i as u32) as i32,
                        &[e.seq_id],
                        logits,
                    )
                    .expect("plan fits the batch");
            }
        }
        let n_prefill = plan.n_tokens()
            - plan
                .entries
                .iter()
                .filter(|e| e.tokens.len() == 1 && e.sample)
                .count();
        let started = Instant::now();
        if let Err(e) = self.ctx.decode(&mut self.batch) {
            tracing::error!(error = %e, "decode failed; failing the batch");
            for e2 in &plan.entries {
                if let Some(seq) = self.batcher.finish(e2.slot) {
                    self.batcher.forget(e2.slot);
                    let _ = self
                        .ctx
                        .clear_kv_cache_seq(Some(seq.seq_id as u32), None, None);
                    let _ = seq
                        .payload
                        .events
                        .send(Event::Failed(EngineError::Internal(e.to_string())));
                }
            }
            return true;
        }
        let elapsed = started.elapsed().as_secs_f64().max(1e-6);
        self.update_speed(n_prefill, elapsed);
        self.batcher.commit(&plan);
        for (slot, idx) in sample_at {
            self.sample(slot, idx);
        }
        true
    }

    fn update_speed(&mut self, n_prefill: usize, elapsed: f64) {
        const ALPHA: f64 = 0.2;
        let ema = |old: f64, new: f64| {
            if old == 0.0 {
                new
            } else {
                old * (1.0 - ALPHA) + new * ALPHA
            }
        };
        if n_prefill > 0 {
            self.stats.prefill_tokens_per_second = ema(
                self.stats.prefill_tokens_per_second,
                n_prefill as f64 / elapsed,
            );
        } else {
            self.stats.decode_tokens_per_second =
                ema(self.stats.decode_tokens_per_second, 1.0 / elapsed);
        }
    }

    fn sample(&mut self, slot: usize, idx: i32) {
        let Some(seq) = self.batcher.seq_mut(slot) else {
            return;
        };
        let token = if seq.payload.greedy {
            LlamaToken(argmax(self.ctx.get_logits_ith(idx)))
        } else {
            seq.payload.sampler.sample(&self.ctx, idx)
        };
        let now = Instant::now();
        let live = &mut seq.payload;
        if live.first_token.is_none() {
            live.phase = tracing::info_span!(parent: &live.span, "worker.decode");
        }
        live.first_token.get_or_insert(now);
        live.last_token = now;
        self.stats.generated_tokens_total += 1;
        if self.model.vocab().is_eog(token) {
            self.end(slot, Finish::Stop);
            return;
        }
        let at_limit = self.batcher.push_token(slot, token.0 as u32);
        let seq = self.batcher.seq_mut(slot).expect("slot still active");
        let live = &mut seq.payload;
        let bytes = self.model.vocab().token_to_piece(token, false, None);
        let piece = live.utf8.push(&bytes);
        let released = live.stops.push(&piece);
        let _ = live.events.send(Event::Delta {
            text: released.text,
            token_ids: vec![token.0 as u32],
        });
        if released.stopped {
            self.end(slot, Finish::Stop);
        } else if at_limit {
            self.end(slot, Finish::Length);
        }
    }

    /// Finishes a sequence normally: flushes held text, sends the summary, frees the slot.
    fn end(&mut self, slot: usize, finish: Finish) {
        // The sequence's cells stay in the KV cache as the slot's prefix cache.
        let Some(mut seq) = self.batcher.finish(slot) else {
            return;
        };
        let live = &mut seq.payload;
        if finish != Finish::Cancelled {
            let tail = live.utf8.finish();
            let mut text = live.stops.push(&tail).text;
            // After a stop string matched, nothing is held back any more.
            text.push_str(&live.stops.finish());
            if !text.is_empty() {
                let _ = live.events.send(Event::Delta {
                    text,
                    token_ids: vec![],
                });
            }
        }
        let admitted = live.admitted.unwrap_or(live.arrived);
        let first = live.first_token.unwrap_or(live.last_token);
        let decode_secs = live
            .last_token
            .saturating_duration_since(first)
            .as_secs_f64();
        let summary = Summary {
            finish,
            prompt_tokens: live.prompt_tokens,
            completion_tokens: seq.generated,
            cached_prompt_tokens: seq.reused,
            queue: admitted.saturating_duration_since(live.arrived),
            time_to_first_token: first.saturating_duration_since(live.arrived),
            decode_tokens_per_second: if seq.generated > 1 && decode_secs > 0.0 {
                (seq.generated - 1) as f64 / decode_secs
            } else {
                0.0
            },
        };
        self.stats.completed_total += 1;
        let _ = live.events.send(Event::Done(summary));
    }

    /// Frees a slot whose client is gone, sending nothing.
    fn release(&mut self, slot: usize) {
        // Its cells stay in the KV cache as the slot's prefix cache.
        self.batcher.finish(slot);
    }

    fn cancel_all(&mut self) {
        for p in self.batcher.drain_queued(|_| true) {
            let _ = p
                .payload
                .events
                .send(Event::Failed(EngineError::Unavailable(
                    "worker is shutting down".into(),
                )));
        }
        for slot in self.batcher.slots_where(|_| true) {
            self.end(slot, Finish::Cancelled);
        }
    }

    fn publish(&mut self, force: bool) {
        if !force && self.last_publish.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last_publish = Instant::now();
        self.stats.active = self.batcher.active() as u32;
        self.stats.queued = self.batcher.queued() as u32;
        // Queued requests' claims count too, so gateways stop placing here as soon as memory is
        // spoken for, not only once it is admitted.
        self.stats.free_kv_tokens = self.batcher.unclaimed_kv_tokens();
        let stats = self.stats.clone();
        self.stats_tx.send_if_modified(|s| {
            if *s == stats {
                false
            } else {
                *s = stats;
                true
            }
        });
    }
}

fn refusal_error(why: Refusal) -> EngineError {
    match why {
        Refusal::TooLong { needed, capacity } => EngineError::InvalidArgument(format!(
            "prompt plus max_tokens needs {needed} tokens of context; this worker has {capacity}"
        )),
        Refusal::QueueFull { limit } => {
            EngineError::ResourceExhausted(format!("admission queue is full ({limit} waiting)"))
        }
        Refusal::QueueTimeout { waited } => EngineError::ResourceExhausted(format!(
            "not admitted after waiting {:.1}s: no free sequence slot or KV cache headroom",
            waited.as_secs_f64()
        )),
    }
}

/// Whether `build_sampler` makes a chain of the greedy sampler alone.
fn is_plain_greedy(s: &Sampling) -> bool {
    s.temperature <= 0.0 && (s.repeat_penalty <= 0.0 || s.repeat_penalty == 1.0)
}

/// The first index of the largest logit, as llama.cpp's greedy sampler picks it — without
/// first copying the whole vocabulary into a candidate array for every sequence and token
/// (201k entries for gpt-oss: a fifth of a millisecond per sequence per step).
fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > logits[best] {
            best = i;
        }
    }
    best as i32
}

fn build_sampler(s: &Sampling, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::new();
    if s.repeat_penalty > 0.0 && s.repeat_penalty != 1.0 {
        chain.push(LlamaSampler::penalties(
            n_vocab,
            64,
            s.repeat_penalty,
            0.0,
            0.0,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p > 0.0 && s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        let seed = s
            .seed
            .map(|v| (v ^ (v >> 32)) as u32)
            .unwrap_or_else(random_seed);
        chain.push(LlamaSampler::dist(seed));
    }
    LlamaSampler::chain_simple(chain)
}

fn random_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|&(n, b)| (n.to_string(), b)).collect()
    }

    #[test]
    fn accounting_measures_accelerators_and_keeps_the_plan_for_host_memory() {
        const MIB: u64 = 1 << 20;
        let mut devices = vec![
            DeviceInfo {
                name: "CUDA0".into(),
                kind: DeviceKind::Gpu,
                weight_bytes: 1000 * MIB,
                planned_weight_bytes: 1000 * MIB,
                kv_bytes: 100 * MIB,
                ..Default::default()
            },
            DeviceInfo {
                name: "CPU".into(),
                kind: DeviceKind::Cpu,
                weight_bytes: 5000 * MIB,
                planned_weight_bytes: 5000 * MIB,
                ..Default::default()
            },
        ];
        account(
            &mut devices,
            &free(&[("CUDA0", 80_000 * MIB), ("CPU", 90_000 * MIB)]),
            &free(&[("CUDA0", 78_990 * MIB), ("CPU", 84_000 * MIB)]),
            &free(&[("CUDA0", 78_640 * MIB), ("CPU", 83_000 * MIB)]),
        );
        let gpu = &devices[0];
        assert!(gpu.measured);
        assert_eq!(gpu.weight_bytes, 1010 * MIB, "what loading took");
        assert_eq!(gpu.planned_weight_bytes, 1000 * MIB, "the prediction stays");
        assert_eq!(gpu.compute_bytes, 250 * MIB, "context minus KV");
        let cpu = &devices[1];
        assert!(!cpu.measured);
        assert_eq!(cpu.weight_bytes, 5000 * MIB);
        assert_eq!(cpu.compute_bytes, 0);
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima_like_the_greedy_sampler() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[-5.0, -2.0, -3.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0]), 2);
    }

    #[test]
    fn accounting_never_underflows_when_free_memory_grew() {
        let mut devices = vec![DeviceInfo {
            name: "CUDA0".into(),
            kind: DeviceKind::Gpu,
            kv_bytes: 10,
            ..Default::default()
        }];
        account(
            &mut devices,
            &free(&[("CUDA0", 100)]),
            &free(&[("CUDA0", 200)]),
            &free(&[("CUDA0", 195)]),
        );
        assert_eq!(devices[0].weight_bytes, 0);
        assert_eq!(devices[0].compute_bytes, 0);
    }
}
