//! Keeps this worker's advert in step with the engine: state, load, KV headroom and memory.

use moe_common::registry::{
    ADVERT_SCHEMA, Capacity, Features, Load, MemoryInfo, OffloadInfo, Speed, WorkerAdvert,
    WorkerState,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::{EngineHandle, EngineStats, LoadedModel};

/// The advert for a loaded model in a given state with given live numbers.
pub fn build(
    id: &str,
    endpoint: &str,
    model: &LoadedModel,
    state: WorkerState,
    stats: &EngineStats,
) -> WorkerAdvert {
    let plan = &model.plan;
    let devices = if stats.devices.is_empty() {
        &model.devices
    } else {
        &stats.devices
    };
    let mode = match model.profile {
        moe_common::offload::OffloadProfile::Auto if plan.n_cpu_moe == 0 => "full",
        moe_common::offload::OffloadProfile::Auto if plan.n_cpu_moe >= model.info.n_layer => {
            "cpu-moe"
        }
        moe_common::offload::OffloadProfile::Auto => "n-cpu-moe",
        p => p.mode(),
    };
    WorkerAdvert {
        schema: ADVERT_SCHEMA,
        id: id.to_string(),
        endpoint: endpoint.to_string(),
        state,
        model: model.info.clone(),
        model_fingerprint: model.fingerprint.clone(),
        // The mode resolved at load (`auto` is never advertised).
        decode_mode: Some(model.decode_mode.as_str().to_string()),
        // From what the worker runs (KV layout, decode mode, devices): see `engine::load`.
        batch_invariant: Some(model.batch_invariant),
        // What the final messages say (`engine::load`); gateways use it for a final message they
        // write themselves.
        system_fingerprint: Some(model.system_fingerprint.clone()).filter(|f| !f.is_empty()),
        // Everything this version serves; gateways keep requests that need a feature off older
        // workers, whose adverts lack it.
        features: Features::all(),
        offload: OffloadInfo {
            mode: mode.to_string(),
            n_cpu_moe: plan.n_cpu_moe,
            profile: model.profile.to_string(),
        },
        // Live device memory from the engine thread; the start-up figures until it publishes.
        devices: devices.to_vec(),
        memory: MemoryInfo {
            weight_bytes: plan.total_weight_bytes,
            kv_bytes: plan.kv_bytes,
            host_expert_bytes: plan.host_expert_bytes,
            host_experts_pinned: model.host_experts_pinned,
            compute_bytes: devices.iter().map(|d| d.compute_bytes).sum(),
            cache_type_k: model.cache_type_k.to_string(),
            cache_type_v: model.cache_type_v.to_string(),
        },
        capacity: Capacity {
            context_tokens: model.context_tokens,
            // Stats the engine has not published yet (context 0) say nothing about headroom:
            // an idle engine's whole cache is free.
            free_kv_tokens: if stats.context_tokens == 0 {
                model.context_tokens
            } else {
                stats.free_kv_tokens.min(model.context_tokens)
            },
            max_sequences: model.max_sequences,
        },
        load: Load {
            active: stats.active,
            queued: stats.queued,
        },
        speed: Speed {
            decode_tokens_per_second: stats.decode_tokens_per_second,
            prefill_tokens_per_second: stats.prefill_tokens_per_second,
        },
        version: moe_common::VERSION.to_string(),
        updated_unix_ms: 0,
    }
}

/// Rebuilds the advert whenever engine stats (which carry live device memory) or the worker
/// state change. Ends when `stop` is cancelled.
pub async fn follow(
    engine: EngineHandle,
    id: String,
    endpoint: String,
    mut state: watch::Receiver<WorkerState>,
    adverts: watch::Sender<WorkerAdvert>,
    stop: CancellationToken,
) {
    let mut stats = engine.stats();
    let model = engine.model().clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = stats.changed() => if r.is_err() { return },
            r = state.changed() => if r.is_err() { return },
        }
        let advert = build(&id, &endpoint, &model, *state.borrow(), &stats.borrow());
        adverts.send_if_modified(|a| {
            let changed = *a != advert;
            if changed {
                *a = advert;
            }
            changed
        });
    }
}
