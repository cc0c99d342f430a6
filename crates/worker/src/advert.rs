//! Keeps this worker's advert in step with the engine: state, load, KV headroom and memory.

use std::sync::Arc;
use std::time::Duration;

use moe_common::registry::{
    ADVERT_SCHEMA, Capacity, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed, WorkerAdvert,
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
    let mode = match model.profile {
        moe_common::offload::OffloadProfile::Auto if plan.n_cpu_moe == 0 => "full",
        moe_common::offload::OffloadProfile::Auto if plan.n_cpu_moe >= model.n_layer => "cpu-moe",
        moe_common::offload::OffloadProfile::Auto => "n-cpu-moe",
        p => p.mode(),
    };
    WorkerAdvert {
        schema: ADVERT_SCHEMA,
        id: id.to_string(),
        endpoint: endpoint.to_string(),
        state,
        model: ModelInfo {
            name: model.name.clone(),
            architecture: model.architecture.clone(),
            n_layer: model.n_layer,
            expert_count: model.expert_count,
            expert_used_count: model.expert_used_count,
            weight_bytes: model.weight_bytes,
        },
        offload: OffloadInfo {
            mode: mode.to_string(),
            n_cpu_moe: plan.n_cpu_moe,
            profile: model.profile.to_string(),
        },
        devices: model.devices.clone(),
        memory: MemoryInfo {
            weight_bytes: plan.total_weight_bytes,
            kv_bytes: plan.kv_bytes,
            host_expert_bytes: plan.host_expert_bytes,
            host_experts_pinned: model.host_experts_pinned,
            compute_bytes: model.devices.iter().map(|d| d.compute_bytes).sum(),
        },
        capacity: Capacity {
            context_tokens: model.context_tokens,
            free_kv_tokens: stats.free_kv_tokens.min(model.context_tokens),
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

/// Rebuilds the advert whenever engine stats or the worker state change, and refreshes device
/// memory every few seconds. Ends when `stop` is cancelled.
pub async fn follow(
    engine: EngineHandle,
    id: String,
    endpoint: String,
    mut state: watch::Receiver<WorkerState>,
    adverts: watch::Sender<WorkerAdvert>,
    stop: CancellationToken,
) {
    let mut stats = engine.stats();
    let mut model: Arc<LoadedModel> = Arc::new(engine.model().clone());
    let mut refresh = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = stats.changed() => if r.is_err() { return },
            r = state.changed() => if r.is_err() { return },
            _ = refresh.tick() => {
                let mut m = (*model).clone();
                crate::engine::refresh_devices(&mut m.devices);
                model = Arc::new(m);
            }
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
