//! Loading: the llama backend, model parameters (which experts stay on the host), placement
//! (the planner's choice for `auto`), the model itself, and the context with its warm-up decode
//! and device-memory accounting.

use std::ffi::CString;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType as LlamaKvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use moe_common::gguf::GgufHeader;
use moe_common::offload::OffloadProfile;
use moe_common::plan::{ACCELERATOR_OVERHEAD_BYTES, KvCacheType, KvLayout, MemoryPlan, ModelShape};
use moe_common::registry::{DeviceKind, ModelInfo};

use super::devices::{
    InvariantKernels, accelerator_pins_host_weights, account, cpu_invariance_verified,
    free_by_device, planned_devices, refresh_devices,
};
use super::{DecodeMode, EngineConfig, EngineError, LoadedModel, Tokenizer};

/// KV streams of the context (llama `n_seq_max`): the running sequences' and the cache-only ones.
fn streams(config: &EngineConfig) -> u32 {
    config.parallel.max(1) + config.cache_sequences
}

/// KV cells of the whole context: `--ctx-size` for the running sequences, plus a running
/// sequence's share for each cache-only stream.
fn kv_cells(config: &EngineConfig) -> u32 {
    let extra =
        config.ctx_size as u64 * config.cache_sequences as u64 / config.parallel.max(1) as u64;
    (config.ctx_size as u64 + extra).min(u32::MAX as u64) as u32
}

/// Tokens per micro-batch: `--ubatch-size`, never more than `--batch-size` (llama.cpp clamps
/// it the same way, and the plan must match what it allocates).
pub(super) fn ubatch(config: &EngineConfig) -> u32 {
    config.ubatch_size.clamp(1, config.batch_size.max(1))
}

/// The KV layout `context_params` asks llama.cpp for, which the plan sizes the cache from
/// (sliding-window layers keep only their window: `swa_full = false`).
fn kv_layout(config: &EngineConfig) -> KvLayout {
    KvLayout {
        cells: kv_cells(config),
        sequences: streams(config),
        unified: config.kv_unified,
        ubatch: ubatch(config),
        swa_full: false,
        outputs_max: streams(config),
        type_k: config.cache_type_k,
        type_v: config.cache_type_v,
    }
}

/// llama-cpp-2's name for a KV cache element type.
fn llama_kv_type(t: KvCacheType) -> LlamaKvCacheType {
    match t {
        KvCacheType::F32 => LlamaKvCacheType::F32,
        KvCacheType::F16 => LlamaKvCacheType::F16,
        KvCacheType::Bf16 => LlamaKvCacheType::BF16,
        KvCacheType::Q8_0 => LlamaKvCacheType::Q8_0,
        KvCacheType::Q4_0 => LlamaKvCacheType::Q4_0,
        KvCacheType::Q4_1 => LlamaKvCacheType::Q4_1,
        KvCacheType::Iq4Nl => LlamaKvCacheType::IQ4_NL,
        KvCacheType::Q5_0 => LlamaKvCacheType::Q5_0,
        KvCacheType::Q5_1 => LlamaKvCacheType::Q5_1,
    }
}

/// The fingerprint streams may move between workers by: the model file's, plus the KV cache
/// types when they are not F16. A quantized cache changes the numbers the model computes, so a
/// stream must not continue on a worker with another cache type (nor reuse its prefix blocks).
fn advertised_fingerprint(file: String, config: &EngineConfig) -> String {
    match (config.cache_type_k, config.cache_type_v) {
        (KvCacheType::F16, KvCacheType::F16) => file,
        (k, v) => format!("{file}+kv-{k}-{v}"),
    }
}

/// Whether some routed experts are multiplied on the host CPU: the placement keeps the first
/// `n_cpu_moe` layers' experts in host memory (`cpu-moe`, `n-cpu-moe:N`, an `auto` plan that
/// does not fit), or `--gpu-layers` leaves layers, with their experts, on the CPU (llama.cpp
/// offloads the last `n_gpu_layers - 1` of `n_layer` layers plus the output layer, so any value
/// up to `n_layer` keeps at least one layer on the host). On an accelerator machine `grouped`
/// (and `auto` as `grouped`) then needs both patches ([`grouped_invariant`],
/// [`resolve_decode_mode`]).
fn experts_on_host(plan: &MemoryPlan, gpu_layers: Option<u32>, n_layer: u32) -> bool {
    plan.host_expert_bytes > 0 || plan.n_cpu_moe > 0 || gpu_layers.is_some_and(|n| n <= n_layer)
}

/// Which of moe-cluster's row-invariant kernels (patches/llama.cpp) this build has, among those
/// the placement needs: CUDA's (0001) on an accelerator, and whether that mode also keeps ops on
/// host-resident weights on the host (`cuda_keeps_host_ops`, 0001 version 2); the CPU's (0002)
/// on a CPU-only worker or for routed experts in host memory, where ggml-cpu uses an
/// instruction set on which its invariance was verified ([`cpu_invariance_verified`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Patched {
    cuda: bool,
    cuda_keeps_host_ops: bool,
    cpu: bool,
}

/// Whether `grouped` decode is batch-invariant here: every kernel that multiplies a call's rows
/// computes each row as it would alone, and every op runs on the same device whatever the row
/// count. On an accelerator that takes CUDA's kernels; with routed experts on the host
/// (`host_experts`) also the CPU's, and CUDA's mode keeping the ops on host weights on the host
/// (`cuda_keeps_host_ops`): without that, llama.cpp moved a MoE expert bias, and the ops after
/// it, to the GPU from 8 decodes of 4 experts, and an H200 gave 0/16 and 0/8 concurrent
/// `cpu-moe` runs equal to solo with both kernel patches (docs/benchmarks/gpu.md, seventh run);
/// with CUDA's version 2, 8/8, 16/16 and 8/8 (eighth run).
/// On a CPU-only worker it takes the CPU's kernels: unpatched, ggml-cpu multiplies a lone row
/// with `vec_dot` but several rows with llamafile's tinyBLAS (another order of additions; the
/// F32 MoE router of every real MoE GGUF takes that path), splits a lone row's flash-attention
/// KV and starts its tiled K-quant product at 8 rows (bench/cpu-invariance-probe.cpp,
/// docs/benchmarks/batch-invariance.md).
fn grouped_invariant(has_accelerator: bool, patched: Patched, host_experts: bool) -> bool {
    if has_accelerator {
        patched.cuda && (!host_experts || (patched.cuda_keeps_host_ops && patched.cpu))
    } else {
        patched.cpu
    }
}

/// `auto` is `grouped` on an accelerator where that is batch-invariant ([`grouped_invariant`]),
/// else `sequential` there. With routed experts in host memory that takes both patches and an
/// AVX2 ggml-cpu; an H200 then gave 8/8, 16/16, 8/8 concurrent runs equal to solo (eighth run)
/// and, in one lease against `sequential` on the same AVX2 backend, 27.3 vs 22.4 tok/s
/// single-stream decode (medians of 8), 21.5 vs 18.3 tok/s aggregate at 8 streams, the same TTFT
/// (docs/benchmarks/gpu.md, ninth run). On a CPU-only worker `auto` is `batched` (throughput,
/// not batch-invariant: a CPU pool that must serve `batch_invariant` requests sets `grouped`,
/// invariant with the CPU patch, or `sequential`); it stays the CPU default because `grouped`
/// reuses cached prefixes only in whole `--batch-size` chunks and prefills prompts one per call.
/// `--gpu-layers 0` does not make a worker CPU-only: llama.cpp still offloads large batches
/// (prompt chunks) of host-resident weights to the GPU (`op_offload`), whose kernels are chosen
/// by the batch's shape too.
///
/// An explicit `grouped` on an accelerator is refused where it would not be invariant: without
/// the CUDA patch, or with host-resident experts and not both patches (version 2 of CUDA's). On
/// a CPU-only worker it is allowed either way and advertised as invariant only with the CPU
/// patch ([`batch_invariant`]).
fn resolve_decode_mode(
    config: &EngineConfig,
    has_accelerator: bool,
    patched: Patched,
    host_experts: bool,
) -> Result<DecodeMode, EngineError> {
    let invariant = grouped_invariant(has_accelerator, patched, host_experts);
    Ok(match config.decode_mode {
        DecodeMode::Auto if has_accelerator && invariant => DecodeMode::Grouped,
        DecodeMode::Auto if has_accelerator => DecodeMode::Sequential,
        DecodeMode::Auto => DecodeMode::Batched,
        DecodeMode::Grouped if has_accelerator && !patched.cuda => {
            return Err(EngineError::Load(
                "--decode-mode grouped: this llama.cpp build lacks moe-cluster's batch-invariance \
                 patch (patches/llama.cpp, applied by scripts/patch-llama.sh; the CUDA backend \
                 does not export ggml_backend_cuda_set_batch_invariant), so batched decode \
                 would not be batch-invariant on this accelerator; use --decode-mode sequential \
                 (batch-invariant on any backend) or run a patched build"
                    .into(),
            ));
        }
        DecodeMode::Grouped if has_accelerator && !invariant => {
            return Err(EngineError::Load(format!(
                "--decode-mode grouped would not be batch-invariant here: this placement keeps \
                 routed experts in host memory (--offload cpu-moe, n-cpu-moe:N, an auto \
                 placement that does not fit, or --gpu-layers), which needs {}; use \
                 --decode-mode sequential (batch-invariant on any build) or batched \
                 (throughput, not batch-invariant), or place every expert on the GPU \
                 (--offload full)",
                if !patched.cuda_keeps_host_ops {
                    "version 2 of moe-cluster's CUDA patch (0001: no op offload while its mode \
                     is on; this build's CUDA backend does not export \
                     ggml_backend_cuda_batch_invariant_version)"
                } else {
                    "moe-cluster's CPU patch (0002, ggml_backend_cpu_set_batch_invariant) in a \
                     ggml-cpu built for x86 AVX2 without AVX-512, where its row invariance was \
                     verified (e.g. the images' default TARGET_CPU=x86-64-v3)"
                }
            )));
        }
        mode => mode,
    })
}

/// The rows the CUDA backend's row-invariant kernels must cover: a grouped decode call has one
/// per running sequence, so `--parallel` of them at most (cache-only streams never decode); at
/// least 2. The engine switches the kernels off for prompt chunks, which would otherwise run
/// row by row up to this many tokens (patches/llama.cpp/README.md).
fn invariant_rows(config: &EngineConfig) -> i32 {
    config.parallel.clamp(2, i32::MAX as u32) as i32
}

/// Whether greedy or seeded output does not depend on what else the worker runs (the advert's
/// `batch_invariant`): each sequence has its own KV stream (a unified cache interleaves
/// concurrent sequences' cells, on any device), and either each sequence is decoded in its own
/// llama.cpp call (`sequential`), or decodes are grouped with kernels that compute each row as
/// alone (`grouped` where [`grouped_invariant`]). `mode` is the resolved mode.
fn batch_invariant(kv_unified: bool, mode: DecodeMode, grouped_invariant: bool) -> bool {
    !kv_unified
        && match mode {
            DecodeMode::Sequential => true,
            DecodeMode::Grouped => grouped_invariant,
            DecodeMode::Batched | DecodeMode::Auto => false,
        }
}

/// The final message's `system_fingerprint` (docs/api.md): what determines this worker's
/// output, hashed ([`super::fingerprint::system_fingerprint`]): the advertised model fingerprint
/// (file and KV cache types), decode mode, batch invariance, expert placement, `--gpu-layers`,
/// batch and micro-batch sizes (prefill shapes), the devices (name and description) and the
/// moe-worker version (the llama.cpp it links).
fn system_fingerprint(
    config: &EngineConfig,
    model_fingerprint: &str,
    mode: DecodeMode,
    invariant: bool,
    plan: &MemoryPlan,
    devices: &[moe_common::registry::DeviceInfo],
) -> String {
    let mut parts = vec![
        model_fingerprint.to_string(),
        format!("decode_mode={}", mode.as_str()),
        format!("batch_invariant={invariant}"),
        format!("n_cpu_moe={}", plan.n_cpu_moe),
        format!(
            "gpu_layers={}",
            config
                .gpu_layers
                .map_or_else(|| "all".to_string(), |n| n.to_string())
        ),
        format!("batch={} ubatch={}", config.batch_size, ubatch(config)),
    ];
    parts.extend(
        devices
            .iter()
            .map(|d| format!("device={}:{}", d.name, d.description)),
    );
    parts.push(format!("version={}", moe_common::VERSION));
    super::fingerprint::system_fingerprint(&parts)
}

/// The process's llama.cpp backend, initialised once. llama-cpp-2 refuses a second
/// `LlamaBackend::init` (`BackendAlreadyInitialized`), so concurrent first calls (several
/// in-process workers starting at once, as the e2e tests do) must not both try: the
/// initialisation runs under a lock, and a caller that waited finds the backend made.
pub(super) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    let _init = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(b) = BACKEND.get() {
        return Ok(b);
    }
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let b = LlamaBackend::init().map_err(|e| EngineError::Load(e.to_string()))?;
    Ok(BACKEND.get_or_init(|| b))
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

fn plan_placement(config: &EngineConfig, shape: &ModelShape) -> Result<MemoryPlan, EngineError> {
    match config.offload {
        OffloadProfile::Auto => {
            let budget = config
                .vram_budget
                .ok_or_else(|| EngineError::Load("--offload auto needs --vram-budget".into()))?;
            shape
                .fit_for(budget, ACCELERATOR_OVERHEAD_BYTES, &kv_layout(config))
                .ok_or_else(|| {
                    EngineError::Load(format!(
                        "model does not fit a VRAM budget of {budget} bytes even with every expert on the host"
                    ))
                })
        }
        profile => Ok(shape.plan_for(profile.n_cpu_moe(shape.n_layer), &kv_layout(config))),
    }
}

/// Loads the model with the placement its profile asks for.
pub(super) fn load_model(config: &EngineConfig) -> Result<(LlamaModel, LoadedModel), EngineError> {
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
    let fingerprint = super::fingerprint::fingerprint(&config.model_path, &header, &model)
        .map_err(|e| EngineError::Load(format!("{}: {e}", config.model_path.display())))?;
    let fingerprint = advertised_fingerprint(fingerprint, config);
    // The row-invariant kernels the placement needs (CUDA's on an accelerator; the CPU's on a
    // CPU-only worker or for host-resident experts, where verified), looked up for `auto` and
    // `grouped`, kept where `grouped` runs invariant and switched on by the engine for decode
    // calls only. They stay off while the context is created: its compute buffers are reserved
    // for a prompt chunk as it will run (with op offload, which CUDA's mode stops while on).
    let host_experts = experts_on_host(&plan, config.gpu_layers, shape.n_layer);
    let rows = invariant_rows(config);
    // Off, known off, before the context exists: the engine's `invariant_kernels_on` starts
    // false, and any worker mode must not inherit an earlier engine's setting.
    InvariantKernels::reset_all();
    let kernels = if matches!(config.decode_mode, DecodeMode::Auto | DecodeMode::Grouped) {
        let cpu_rows = if has_accelerator {
            host_experts
        } else {
            config.decode_mode == DecodeMode::Grouped
        };
        InvariantKernels::find(
            has_accelerator.then_some(rows),
            cpu_rows && cpu_invariance_verified(),
        )
    } else {
        InvariantKernels::default()
    };
    let patched = Patched {
        cuda: kernels.cuda(),
        cuda_keeps_host_ops: kernels.cuda_keeps_host_ops(),
        cpu: kernels.cpu(),
    };
    let decode_mode = resolve_decode_mode(config, has_accelerator, patched, host_experts)?;
    let grouped_invariant = grouped_invariant(has_accelerator, patched, host_experts);
    let invariant_kernels = (decode_mode == DecodeMode::Grouped && grouped_invariant).then(|| {
        tracing::info!(
            cuda = patched.cuda,
            cuda_keeps_host_ops = patched.cuda_keeps_host_ops,
            cpu = patched.cpu,
            max_rows = rows,
            "batch-invariant kernels on for decode calls"
        );
        kernels
    });
    let invariant = batch_invariant(config.kv_unified, decode_mode, grouped_invariant);
    let system_fingerprint = system_fingerprint(
        config,
        &fingerprint,
        decode_mode,
        invariant,
        &plan,
        &devices,
    );
    let info = LoadedModel {
        fingerprint,
        info: ModelInfo {
            name,
            architecture: header.architecture().unwrap_or("unknown").to_string(),
            n_layer: model.n_layer(),
            expert_count: shape.expert_count,
            expert_used_count: shape.expert_used_count,
            weight_bytes: model.size(),
        },
        profile: config.offload,
        plan,
        devices,
        context_tokens: config.ctx_size,
        sequence_tokens: config.ctx_size,
        sliding_window: header
            .arch_u64("attention.sliding_window")
            .and_then(|w| u32::try_from(w).ok())
            .unwrap_or(0),
        max_sequences: config.parallel,
        has_accelerator,
        decode_mode,
        batch_invariant: invariant,
        system_fingerprint,
        cache_sequences: config.cache_sequences,
        host_experts_pinned,
        cache_type_k: config.cache_type_k,
        cache_type_v: config.cache_type_v,
        // Present only where the mode resolved to `grouped` (it does whenever they are on).
        invariant_kernels,
    };
    Ok((model, info))
}

/// The context's threads: `--threads`, else every core.
pub(super) fn threads(config: &EngineConfig) -> i32 {
    config
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get() as u32))
        as i32
}

fn context_params(config: &EngineConfig) -> LlamaContextParams {
    let threads = threads(config);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(kv_cells(config)))
        .with_n_batch(config.batch_size)
        .with_n_ubatch(ubatch(config))
        .with_n_seq_max(streams(config))
        .with_kv_unified(config.kv_unified)
        // Sliding-window layers keep only their window (as llama-server does), not full-size
        // KV; prefix reuse checks what they still hold (see `reuse_allowed`).
        .with_swa_full(false)
        .with_type_k(llama_kv_type(config.cache_type_k))
        .with_type_v(llama_kv_type(config.cache_type_v))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    // Each sequence samples at most one position per decode call (the last prompt token or the
    // decoded one), so a call never has more outputs than KV streams: the compute buffers need
    // logits for that many rows, not for a whole micro-batch (n_vocab × n_ubatch × 4 bytes,
    // 393 MiB for gpt-oss at 512). llama.cpp asserts outputs per call <= n_outputs_max, and
    // n_seq_max <= n_outputs_max.
    with_n_outputs_max(params, streams(config))
}

/// Sets llama.cpp's `n_outputs_max`, which llama-cpp-2 0.1.160 has no setter for.
fn with_n_outputs_max(mut params: LlamaContextParams, n: u32) -> LlamaContextParams {
    use llama_cpp_sys_2::llama_context_params as Raw;
    // `LlamaContextParams` is a struct whose one field is the raw `llama_context_params`: with
    // equal size and alignment that field is at offset 0 (checked at compile time).
    const _: () = assert!(
        size_of::<LlamaContextParams>() == size_of::<Raw>()
            && align_of::<LlamaContextParams>() == align_of::<Raw>()
    );
    // SAFETY: the wrapper is exactly the raw struct (see above), a plain C struct; writing one
    // u32 field keeps it valid.
    unsafe {
        (*(&mut params as *mut LlamaContextParams).cast::<Raw>()).n_outputs_max = n;
    }
    params
}

/// What `with_n_outputs_max` wrote (tests).
#[cfg(test)]
fn n_outputs_max(params: &LlamaContextParams) -> u32 {
    // SAFETY: as in `with_n_outputs_max`.
    unsafe {
        (*(params as *const LlamaContextParams).cast::<llama_cpp_sys_2::llama_context_params>())
            .n_outputs_max
    }
}

/// Loads the model and creates a warmed-up context on it, measuring what each took from the
/// accelerators' free memory (call with nothing else allocating on the devices meanwhile).
/// `with_context` runs on the calling thread with the model, the context, the model's
/// description and a tokenizer for other threads; the context borrows the model, hence the
/// callback (the context is dropped before the model).
pub(super) fn open<R>(
    config: &EngineConfig,
    with_context: impl FnOnce(&LlamaModel, LlamaContext<'_>, LoadedModel, Tokenizer) -> R,
) -> Result<R, EngineError> {
    backend()?;
    let free_before = free_by_device();
    let (model, mut info) = load_model(config)?;
    let model = Arc::new(model);
    let free_loaded = free_by_device();
    let mut ctx = model
        .new_context(backend()?, context_params(config))
        .map_err(|e| EngineError::Load(format!("creating context: {e}")))?;
    warm_up(&mut ctx, &model).map_err(|e| EngineError::Load(format!("warm-up decode: {e}")))?;
    account(
        &mut info.devices,
        &free_before,
        &free_loaded,
        &free_by_device(),
    );
    refresh_devices(&mut info.devices);
    // llama.cpp rounds each stream's share up to 256 cells and n_ctx to whole shares; the
    // running sequences' cells are what the context advertises (cache-only streams hold idle
    // prefixes, which a new request cannot claim).
    if config.kv_unified {
        info.context_tokens = ctx.n_ctx();
        info.sequence_tokens = info.context_tokens;
    } else {
        info.sequence_tokens = ctx.n_ctx() / streams(config);
        info.context_tokens = info.sequence_tokens * config.parallel.max(1);
    }
    let tokenizer = Tokenizer::new(model.clone());
    Ok(with_context(&model, ctx, info, tokenizer))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(batch: u32, ubatch: u32) -> EngineConfig {
        EngineConfig {
            model_path: "m.gguf".into(),
            model_name: None,
            offload: OffloadProfile::Full,
            vram_budget: None,
            gpu_layers: None,
            ctx_size: 16384,
            parallel: 16,
            cache_sequences: 2,
            threads: Some(2),
            batch_size: batch,
            ubatch_size: ubatch,
            kv_unified: false,
            cache_type_k: KvCacheType::F16,
            cache_type_v: KvCacheType::F16,
            decode_mode: DecodeMode::Auto,
            grouped_rows: 16,
            max_queue: 8,
            queue_timeout: std::time::Duration::from_secs(1),
        }
    }

    #[test]
    fn context_params_carry_the_micro_batch_and_one_output_per_stream() {
        let c = config(2048, 128);
        let p = context_params(&c);
        assert_eq!(p.n_batch(), 2048);
        assert_eq!(p.n_ubatch(), 128);
        assert_eq!(p.n_seq_max(), 18);
        assert_eq!(n_outputs_max(&p), 18, "one sampled row per KV stream");
        // The raw write left the wrapper's other fields alone.
        assert_eq!(p.n_ctx(), NonZeroU32::new(kv_cells(&c)));
        let kv = kv_layout(&c);
        assert_eq!((kv.ubatch, kv.sequences, kv.swa_full), (128, 18, false));
        // Never more than the batch, as llama.cpp clamps it.
        assert_eq!(context_params(&config(256, 512)).n_ubatch(), 256);
        assert_eq!(kv_layout(&config(256, 512)).ubatch, 256);
    }

    #[test]
    fn concurrent_first_calls_share_one_backend() {
        // Before the lock, two workers starting at once could both call LlamaBackend::init and
        // one failed with BackendAlreadyInitialized (seen in CI: an e2e worker "stopped before
        // serving").
        let threads: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(|| backend().map(|b| b as *const LlamaBackend as usize)))
            .collect();
        let got: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().expect("no panic").expect("backend"))
            .collect();
        assert!(got.windows(2).all(|w| w[0] == w[1]), "{got:?}");
    }

    #[test]
    fn the_resolved_decode_mode_is_never_auto() {
        // What the advert's `decode_mode` carries: `auto` resolved by whether the backend has an
        // accelerator, `--gpu-layers 0` or not (large batches are still offloaded to it),
        // whether that accelerator has the batch-invariance patch, and whether routed experts
        // run on the host CPU.
        let resolve = |c: &EngineConfig, accelerator, patched, host| {
            resolve_decode_mode(c, accelerator, patched, host).expect("resolves")
        };
        let mut c = config(2048, 512);
        assert_eq!(resolve(&c, true, UNPATCHED, false), DecodeMode::Sequential);
        assert_eq!(resolve(&c, true, CUDA_ONLY, false), DecodeMode::Grouped);
        assert_eq!(resolve(&c, false, UNPATCHED, false), DecodeMode::Batched);
        // Host experts on an accelerator: sequential whatever the patches (not invariant on an
        // H200 host even with both); the CPU-only worker needs the CPU patch only.
        for patched in [UNPATCHED, CUDA_ONLY, CPU_ONLY, BOTH] {
            assert_eq!(resolve(&c, true, patched, true), DecodeMode::Sequential);
        }
        for patched in [UNPATCHED, CUDA_ONLY] {
            assert_eq!(resolve(&c, false, patched, true), DecodeMode::Batched);
        }
        assert_eq!(resolve(&c, false, CPU_ONLY, true), DecodeMode::Batched);
        // `--gpu-layers 0` keeps every layer, routed experts included, on the host CPU.
        c.gpu_layers = Some(0);
        let host = experts_on_host(&MemoryPlan::default(), c.gpu_layers, 24);
        assert!(host);
        for patched in [UNPATCHED, CUDA_ONLY, CPU_ONLY] {
            assert_eq!(resolve(&c, true, patched, host), DecodeMode::Sequential);
        }
        for mode in [DecodeMode::Sequential, DecodeMode::Batched] {
            c.decode_mode = mode;
            for accelerator in [false, true] {
                for patched in [UNPATCHED, CUDA_ONLY, CPU_ONLY, BOTH] {
                    for host in [false, true] {
                        assert_eq!(resolve(&c, accelerator, patched, host), mode);
                    }
                }
            }
        }
    }

    #[test]
    fn host_experts_come_from_the_placement_or_gpu_layers() {
        let full = MemoryPlan::default();
        assert!(!experts_on_host(&full, None, 24));
        let cpu_moe = MemoryPlan {
            n_cpu_moe: 24,
            host_expert_bytes: 1 << 30,
            ..MemoryPlan::default()
        };
        assert!(experts_on_host(&cpu_moe, None, 24));
        let n_cpu_moe = MemoryPlan {
            n_cpu_moe: 2,
            host_expert_bytes: 1 << 20,
            ..MemoryPlan::default()
        };
        assert!(experts_on_host(&n_cpu_moe, None, 24));
        // llama.cpp offloads the last `n - 1` layers plus the output layer: all 24 need 25.
        assert!(experts_on_host(&full, Some(0), 24));
        assert!(experts_on_host(&full, Some(12), 24));
        assert!(experts_on_host(&full, Some(24), 24));
        assert!(!experts_on_host(&full, Some(25), 24));
        assert!(!experts_on_host(&full, Some(999), 24));
    }

    const fn patched(cuda: bool, cpu: bool) -> Patched {
        Patched {
            cuda,
            cuda_keeps_host_ops: false,
            cpu,
        }
    }
    const UNPATCHED: Patched = patched(false, false);
    const BOTH: Patched = patched(true, true);
    const CUDA_ONLY: Patched = patched(true, false);
    const CPU_ONLY: Patched = patched(false, true);
    /// Version 2 of CUDA's patch (no op offload while on), with or without the CPU's.
    const CUDA2_ONLY: Patched = Patched {
        cuda: true,
        cuda_keeps_host_ops: true,
        cpu: false,
    };
    const BOTH2: Patched = Patched {
        cuda: true,
        cuda_keeps_host_ops: true,
        cpu: true,
    };

    #[test]
    fn grouped_is_invariant_only_where_every_backend_multiplying_rows_is_patched() {
        // accelerator, every expert on it: CUDA's kernels only.
        for patched in [CUDA_ONLY, BOTH, CUDA2_ONLY, BOTH2] {
            assert!(grouped_invariant(true, patched, false));
        }
        assert!(!grouped_invariant(true, CPU_ONLY, false));
        // accelerator with host experts: CUDA's kernels without op offload, and the CPU's
        // (with version 1 an H200 gave 0/16 with both patches: llama.cpp offloaded a MoE
        // expert bias to the GPU from 8 decodes).
        assert!(grouped_invariant(true, BOTH2, true));
        for patched in [UNPATCHED, CUDA_ONLY, CPU_ONLY, BOTH, CUDA2_ONLY] {
            assert!(!grouped_invariant(true, patched, true), "{patched:?}");
        }
        // CPU-only: the CPU's.
        for host in [false, true] {
            assert!(grouped_invariant(false, CPU_ONLY, host));
            assert!(grouped_invariant(false, BOTH, host));
            assert!(!grouped_invariant(false, CUDA_ONLY, host));
            assert!(!grouped_invariant(false, UNPATCHED, host));
        }
    }

    #[test]
    fn auto_is_grouped_where_invariant_else_sequential_on_an_accelerator_batched_on_a_cpu() {
        let c = config(2048, 512);
        let mode = |acc, patched, host| resolve_decode_mode(&c, acc, patched, host).expect("auto");
        assert_eq!(mode(true, CUDA_ONLY, false), DecodeMode::Grouped);
        // host experts: grouped where it is invariant (both patches, CUDA's at version 2).
        assert_eq!(mode(true, BOTH2, true), DecodeMode::Grouped);
        assert_eq!(mode(true, BOTH2, false), DecodeMode::Grouped);
        assert_eq!(mode(true, BOTH, true), DecodeMode::Sequential);
        assert_eq!(mode(true, CUDA2_ONLY, true), DecodeMode::Sequential);
        assert_eq!(mode(true, CUDA_ONLY, true), DecodeMode::Sequential);
        assert_eq!(mode(true, UNPATCHED, false), DecodeMode::Sequential);
        assert_eq!(mode(false, CPU_ONLY, false), DecodeMode::Batched);
        assert_eq!(mode(false, UNPATCHED, false), DecodeMode::Batched);
    }

    #[test]
    fn grouped_needs_the_patches_on_an_accelerator_only() {
        let mut c = config(2048, 512);
        c.decode_mode = DecodeMode::Grouped;
        for patched in [CUDA_ONLY, BOTH] {
            assert_eq!(
                resolve_decode_mode(&c, true, patched, false).expect("patched"),
                DecodeMode::Grouped
            );
        }
        // CPU-only: allowed, patch or not, wherever the experts are.
        for patched in [UNPATCHED, CPU_ONLY] {
            for host in [false, true] {
                assert_eq!(
                    resolve_decode_mode(&c, false, patched, host).expect("CPU"),
                    DecodeMode::Grouped
                );
            }
        }
        for host in [false, true] {
            let Err(EngineError::Load(msg)) = resolve_decode_mode(&c, true, CPU_ONLY, host) else {
                panic!("an accelerator without the CUDA patch must refuse grouped");
            };
            for what in ["batch-invariance patch", "patches/llama.cpp", "sequential"] {
                assert!(msg.contains(what), "{what}: {msg}");
            }
        }
        // Host experts on an accelerator: allowed with both patches (CUDA's at version 2),
        // else refused, and the message says what is missing and what to use instead.
        assert_eq!(
            resolve_decode_mode(&c, true, BOTH2, true).expect("both patches"),
            DecodeMode::Grouped
        );
        for (patched, missing) in [
            (CUDA_ONLY, "ggml_backend_cuda_batch_invariant_version"),
            (BOTH, "ggml_backend_cuda_batch_invariant_version"),
            (CUDA2_ONLY, "ggml_backend_cpu_set_batch_invariant"),
        ] {
            let Err(EngineError::Load(msg)) = resolve_decode_mode(&c, true, patched, true) else {
                panic!("grouped with host experts and {patched:?} must be refused");
            };
            for what in [
                "not be batch-invariant",
                "host memory",
                missing,
                "sequential",
                "batched",
            ] {
                assert!(msg.contains(what), "{what}: {msg}");
            }
        }
    }

    #[test]
    fn the_invariant_kernels_cover_every_running_sequence() {
        assert_eq!(
            invariant_rows(&config(2048, 512)),
            16,
            "not the 2 cache-only"
        );
        let mut c = config(2048, 512);
        (c.parallel, c.cache_sequences) = (1, 0);
        assert_eq!(invariant_rows(&c), 2, "at least 2");
    }

    #[test]
    fn no_cuda_backend_no_cuda_switch() {
        // This crate's tests link the CPU backend only: CUDA's switch is absent. The CPU's is
        // there when the build has patch 0002 (scripts/patch-llama.sh).
        backend().expect("backend");
        let cuda = llama_cpp_2::list_llama_ggml_backend_devices()
            .iter()
            .any(|d| d.backend == "CUDA");
        if !cuda {
            assert!(!InvariantKernels::find(Some(8), false).cuda());
        }
        assert!(!InvariantKernels::find(None, false).cpu(), "not looked up");
        // scripts/test.sh patches llama.cpp before it builds and says so: a build that lost
        // the CPU switch would quietly resolve CPU `auto` to batched (not invariant) again.
        if std::env::var_os("MOE_EXPECT_LLAMA_PATCHES").is_some_and(|v| v == "1") {
            assert!(
                InvariantKernels::find(None, true).cpu(),
                "MOE_EXPECT_LLAMA_PATCHES=1 but this build's CPU backend has no \
                 ggml_backend_cpu_set_batch_invariant (run scripts/patch-llama.sh --registry)"
            );
        }
    }

    #[test]
    fn batch_invariant_needs_per_sequence_kv_and_an_invariant_decode() {
        use DecodeMode::{Batched, Grouped, Sequential};
        // Per-sequence KV streams: sequential decode anywhere; grouped where its kernels are
        // row-invariant; batched never.
        for grouped in [false, true] {
            assert!(batch_invariant(false, Sequential, grouped));
            assert_eq!(batch_invariant(false, Grouped, grouped), grouped);
            assert!(!batch_invariant(false, Batched, grouped));
        }
        // A unified KV cache: never, whatever the mode.
        for mode in [Sequential, Batched, Grouped] {
            for grouped in [false, true] {
                assert!(!batch_invariant(true, mode, grouped));
            }
        }
        // What `load_model` feeds it: `auto` resolves to an invariant mode on an accelerator
        // (`--gpu-layers 0` included: llama.cpp still offloads large batches), to `batched` on a
        // CPU-only worker; an explicit `grouped` there is invariant with the CPU patch.
        let mut c = config(2048, 512);
        for gpu_layers in [None, Some(0)] {
            c.gpu_layers = gpu_layers;
            for accelerator in [false, true] {
                for patched in [UNPATCHED, CUDA_ONLY, CPU_ONLY, BOTH, CUDA2_ONLY, BOTH2] {
                    for host in [false, true] {
                        let mode =
                            resolve_decode_mode(&c, accelerator, patched, host).expect("resolves");
                        let g = grouped_invariant(accelerator, patched, host);
                        assert_eq!(batch_invariant(c.kv_unified, mode, g), accelerator);
                    }
                }
            }
        }
        c.kv_unified = true;
        assert!(!batch_invariant(c.kv_unified, Sequential, true));
        assert!(!batch_invariant(c.kv_unified, Grouped, true));
    }

    #[test]
    fn the_system_fingerprint_names_the_configuration_and_is_stable() {
        let c = config(2048, 512);
        let plan = MemoryPlan::default();
        let fp = |c: &EngineConfig, mode, invariant| {
            system_fingerprint(c, "v1-ab", mode, invariant, &plan, &[])
        };
        let base = fp(&c, DecodeMode::Sequential, true);
        assert!(base.starts_with("fp_") && base.len() == 19, "{base}");
        assert!(base[3..].chars().all(|ch| ch.is_ascii_hexdigit()), "{base}");
        assert_eq!(base, fp(&c, DecodeMode::Sequential, true), "stable");
        let mut others = vec![
            fp(&c, DecodeMode::Batched, true),
            fp(&c, DecodeMode::Grouped, true),
            fp(&c, DecodeMode::Sequential, false),
            system_fingerprint(&c, "v1-cd", DecodeMode::Sequential, true, &plan, &[]),
        ];
        let mut small = config(256, 256);
        small.gpu_layers = Some(0);
        others.push(fp(&small, DecodeMode::Sequential, true));
        for other in &others {
            assert_ne!(&base, other);
        }
    }

    #[test]
    fn kv_cache_types_reach_llama_cpp_the_plan_and_the_fingerprint() {
        let mut c = config(2048, 512);
        assert_eq!(advertised_fingerprint("v1-ab".into(), &c), "v1-ab");
        c.cache_type_k = KvCacheType::Q8_0;
        c.cache_type_v = KvCacheType::Q4_0;
        let p = context_params(&c);
        assert_eq!(p.type_k(), LlamaKvCacheType::Q8_0);
        assert_eq!(p.type_v(), LlamaKvCacheType::Q4_0);
        let kv = kv_layout(&c);
        assert_eq!(
            (kv.type_k, kv.type_v),
            (KvCacheType::Q8_0, KvCacheType::Q4_0)
        );
        assert_eq!(
            advertised_fingerprint("v1-ab".into(), &c),
            "v1-ab+kv-q8_0-q4_0"
        );
    }
}
