//! The worker advert: the JSON document a worker keeps at `<prefix>/workers/<id>`.
//! Every field is documented in docs/registry.md; keep the two in step.

use serde::{Deserialize, Serialize};

use super::Features;

/// Version of the advert schema; bumped on incompatible changes.
pub const ADVERT_SCHEMA: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Registered, still loading or warming up: receives no traffic.
    Starting,
    /// Serving.
    Ready,
    /// Finishing its streams before leaving: receives no new traffic.
    Draining,
}

impl WorkerState {
    /// The name used in the advert JSON and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Name requests use to pick this model (`GenerateRequest.model`).
    pub name: String,
    /// GGUF `general.architecture`, e.g. `llama`, `gpt-oss`.
    pub architecture: String,
    pub n_layer: u32,
    pub expert_count: u32,
    pub expert_used_count: u32,
    /// Size of the GGUF file's tensor data in bytes.
    pub weight_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OffloadInfo {
    /// `full`, `cpu-moe` or `n-cpu-moe` (after `auto` planning, the mode it chose).
    pub mode: String,
    /// Layers whose routed experts stay in host memory (0 for `full`, n_layer for `cpu-moe`).
    pub n_cpu_moe: u32,
    /// The profile as written on the command line: `full`, `cpu-moe`, `n-cpu-moe:N`, `auto`.
    pub profile: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
    #[default]
    Unknown,
}

impl DeviceKind {
    /// The name used in the advert JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::IntegratedGpu => "integrated_gpu",
            DeviceKind::Accelerator => "accelerator",
            DeviceKind::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// ggml device name, e.g. `CPU`, `CUDA0`.
    pub name: String,
    pub description: String,
    pub kind: DeviceKind,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Bytes of model weights on this device: measured (see `measured`), else as planned.
    pub weight_bytes: u64,
    /// Bytes of model weights the planner predicted for this device before loading.
    #[serde(default)]
    pub planned_weight_bytes: u64,
    /// Bytes of KV cache placed on this device.
    pub kv_bytes: u64,
    /// Bytes of llama.cpp compute buffers on this device (measured; 0 when not measured).
    #[serde(default)]
    pub compute_bytes: u64,
    /// Whether `weight_bytes` and `compute_bytes` were measured from the device's free memory
    /// around loading (accelerators), rather than taken from the plan (host memory).
    #[serde(default)]
    pub measured: bool,
    /// This process's memory on the device as the driver reports it (NVML: what `nvidia-smi`
    /// shows); absent where the driver cannot tell (CPU, no NVML, no permission).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_bytes: Option<u64>,
    /// `process_bytes` minus weights, KV and compute buffers: the CUDA context, cuBLAS
    /// workspaces and pools. 0 when `process_bytes` is absent.
    #[serde(default)]
    pub overhead_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Model weight bytes on all devices together.
    pub weight_bytes: u64,
    /// KV cache bytes on all devices together.
    pub kv_bytes: u64,
    /// Routed-expert weight bytes kept in host memory by the offload profile.
    pub host_expert_bytes: u64,
    /// Whether those host experts live in pinned (page-locked) memory that the accelerator
    /// copies from at full speed, rather than pageable or memory-mapped pages.
    #[serde(default)]
    pub host_experts_pinned: bool,
    /// Compute buffer bytes on all devices together (measured ones).
    #[serde(default)]
    pub compute_bytes: u64,
    /// Element types of the K and V caches (`--cache-type-k`, `--cache-type-v`: `f16`, `q8_0`,
    /// ...); `kv_bytes` is sized for them. Workers before this field: `f16`.
    #[serde(default = "f16")]
    pub cache_type_k: String,
    #[serde(default = "f16")]
    pub cache_type_v: String,
}

fn f16() -> String {
    "f16".into()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// KV cache size in tokens (cells), shared by all sequences.
    pub context_tokens: u32,
    /// Tokens of KV not reserved by admitted requests.
    pub free_kv_tokens: u32,
    /// Sequences decoded together at most (`--parallel`).
    pub max_sequences: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Sequences admitted into the batch.
    pub active: u32,
    /// Requests waiting for admission.
    pub queued: u32,
}

/// Measured speed, zero until the worker has served enough to know.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Speed {
    /// Decode tokens per second of one sequence (recent average).
    pub decode_tokens_per_second: f64,
    /// Prompt tokens processed per second (recent average).
    pub prefill_tokens_per_second: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerAdvert {
    pub schema: u32,
    pub id: String,
    /// gRPC endpoint gateways dial, e.g. `http://10.0.0.7:50061`.
    pub endpoint: String,
    pub state: WorkerState,
    pub model: ModelInfo,
    /// Identity of the model file the worker serves (vocabulary, special tokens, weights): a
    /// stream may move only to a worker with the same fingerprint. Empty from workers that
    /// compute none (gateways then fall back to the model name).
    #[serde(default)]
    pub model_fingerprint: String,
    pub offload: OffloadInfo,
    /// How the worker's engine decodes (`--decode-mode`, as resolved at load): `sequential` (one
    /// llama.cpp call per sequence: greedy output does not depend on other traffic), `batched`
    /// (one call per step for all sequences: faster, batch-invariant on the CPU only) or
    /// `grouped` (prompts one sequence per call, decodes all together with kernels that compute
    /// each row as alone: batch-invariant). Never `auto`. Absent (`None`) from workers older
    /// than the field: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_mode: Option<String>,
    /// Whether the worker's greedy or seeded output does not depend on what else it runs:
    /// per-sequence KV streams (not `--kv-unified`) and either `sequential` or `grouped` decode or no
    /// accelerator (CPU kernels are row-independent; GPU ones pick kernels by batch shape, and
    /// llama.cpp sends large batches to a GPU even at `--gpu-layers 0`). Requests with `batch_invariant` set go only to workers where this is `Some(true)`.
    /// Absent (`None`) from workers older than the field: unknown, never treated as invariant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_invariant: Option<bool>,
    /// The `system_fingerprint` the worker puts on its final messages (`fp_` and 16 hex digits:
    /// a hash of the model fingerprint, decode mode, invariance, placement, devices and
    /// version). Gateways use it for the final message they write themselves when the worker
    /// produced every token but ended the stream without one. Absent (`None`) from workers
    /// older than the field: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// What the worker can do beyond plain generation ([`Features`]); absent from older workers,
    /// which have none of them. Gateways place a request only on workers with every feature it
    /// needs.
    #[serde(default)]
    pub features: Features,
    pub devices: Vec<DeviceInfo>,
    pub memory: MemoryInfo,
    pub capacity: Capacity,
    pub load: Load,
    #[serde(default)]
    pub speed: Speed,
    /// moe-worker version.
    pub version: String,
    /// Milliseconds since the Unix epoch when this advert was written.
    pub updated_unix_ms: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdvertError {
    #[error("advert is not valid JSON for schema {ADVERT_SCHEMA}: {0}")]
    Json(String),
    #[error("advert schema {0} is not supported (expected {ADVERT_SCHEMA})")]
    Schema(u32),
    #[error("advert id {id:?} does not match its key {key:?}")]
    IdMismatch { id: String, key: String },
    #[error("advert endpoint {0:?} is not an http(s)://host:port address")]
    Endpoint(String),
    #[error("advert capacity is inconsistent: {0}")]
    Capacity(String),
}

impl WorkerAdvert {
    /// Parses and validates an advert read from `key`. Gateways route only to adverts that pass.
    pub fn from_json(key: &str, bytes: &[u8]) -> Result<Self, AdvertError> {
        let advert: WorkerAdvert =
            serde_json::from_slice(bytes).map_err(|e| AdvertError::Json(e.to_string()))?;
        if advert.schema != ADVERT_SCHEMA {
            return Err(AdvertError::Schema(advert.schema));
        }
        let key_id = key.rsplit('/').next().unwrap_or_default();
        if advert.id.is_empty() || advert.id != key_id {
            return Err(AdvertError::IdMismatch {
                id: advert.id,
                key: key.to_string(),
            });
        }
        if !valid_endpoint(&advert.endpoint) {
            return Err(AdvertError::Endpoint(advert.endpoint));
        }
        let c = &advert.capacity;
        if c.free_kv_tokens > c.context_tokens || c.max_sequences == 0 {
            return Err(AdvertError::Capacity(format!(
                "free_kv_tokens {} context_tokens {} max_sequences {}",
                c.free_kv_tokens, c.context_tokens, c.max_sequences
            )));
        }
        Ok(advert)
    }

    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Whether the worker wants new requests.
    pub fn is_ready(&self) -> bool {
        self.state == WorkerState::Ready
    }
}

fn valid_endpoint(endpoint: &str) -> bool {
    let Some(rest) = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
    else {
        return false;
    };
    match rest.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(id: &str) -> WorkerAdvert {
        WorkerAdvert {
            schema: ADVERT_SCHEMA,
            id: id.to_string(),
            endpoint: "http://127.0.0.1:50061".into(),
            state: WorkerState::Ready,
            model: ModelInfo {
                name: "m".into(),
                ..Default::default()
            },
            model_fingerprint: String::new(),
            offload: OffloadInfo {
                mode: "full".into(),
                n_cpu_moe: 0,
                profile: "full".into(),
            },
            decode_mode: Some("sequential".into()),
            batch_invariant: Some(true),
            system_fingerprint: Some("fp_0123456789abcdef".into()),
            features: Features::all(),
            devices: vec![],
            memory: MemoryInfo::default(),
            capacity: Capacity {
                context_tokens: 4096,
                free_kv_tokens: 4096,
                max_sequences: 4,
            },
            load: Load::default(),
            speed: Speed::default(),
            version: "0".into(),
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn round_trips_through_json() {
        let a = sample("w1");
        let json = a.to_json().unwrap();
        assert_eq!(WorkerAdvert::from_json("/moe/v1/workers/w1", &json), Ok(a));
    }

    #[test]
    fn decode_mode_round_trips_and_is_optional() {
        let mut a = sample("w1");
        a.decode_mode = Some("batched".into());
        let json = a.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["decode_mode"], "batched");
        assert_eq!(WorkerAdvert::from_json("/p/workers/w1", &json), Ok(a));

        // A worker older than the field: the advert still parses, the mode is unknown.
        let mut old = v;
        old.as_object_mut().unwrap().remove("decode_mode");
        let parsed = WorkerAdvert::from_json("/p/workers/w1", old.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.decode_mode, None);
        let mut unknown = sample("w1");
        unknown.decode_mode = None;
        let json = unknown.to_json().unwrap();
        assert!(
            !String::from_utf8(json.clone())
                .unwrap()
                .contains("decode_mode")
        );
        assert_eq!(WorkerAdvert::from_json("/p/workers/w1", &json), Ok(unknown));
    }

    #[test]
    fn batch_invariant_round_trips_and_is_optional() {
        for value in [true, false] {
            let mut a = sample("w1");
            a.batch_invariant = Some(value);
            let json = a.to_json().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
            assert_eq!(v["batch_invariant"], value);
            assert_eq!(WorkerAdvert::from_json("/p/workers/w1", &json), Ok(a));
        }
        // A worker older than the field: the advert still parses, invariance is unknown.
        let mut old = serde_json::to_value(sample("w1")).unwrap();
        old.as_object_mut().unwrap().remove("batch_invariant");
        let parsed = WorkerAdvert::from_json("/p/workers/w1", old.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.batch_invariant, None);
        let mut unknown = sample("w1");
        unknown.batch_invariant = None;
        let json = String::from_utf8(unknown.to_json().unwrap()).unwrap();
        assert!(!json.contains("batch_invariant"), "{json}");
    }

    #[test]
    fn system_fingerprint_round_trips_and_is_optional() {
        let a = sample("w1");
        let json = a.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["system_fingerprint"], "fp_0123456789abcdef");
        assert_eq!(WorkerAdvert::from_json("/p/workers/w1", &json), Ok(a));
        // A worker older than the field: the advert still parses, the fingerprint is unknown.
        let mut old = serde_json::to_value(sample("w1")).unwrap();
        old.as_object_mut().unwrap().remove("system_fingerprint");
        let parsed = WorkerAdvert::from_json("/p/workers/w1", old.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.system_fingerprint, None);
        let mut unknown = sample("w1");
        unknown.system_fingerprint = None;
        let json = String::from_utf8(unknown.to_json().unwrap()).unwrap();
        assert!(!json.contains("system_fingerprint"), "{json}");
    }

    #[test]
    fn rejects_malformed_adverts() {
        let key = "/p/workers/w1";
        assert!(matches!(
            WorkerAdvert::from_json(key, b"{not json"),
            Err(AdvertError::Json(_))
        ));
        let mut a = sample("other");
        assert!(matches!(
            WorkerAdvert::from_json(key, &a.to_json().unwrap()),
            Err(AdvertError::IdMismatch { .. })
        ));
        a = sample("w1");
        a.endpoint = "10.0.0.1".into();
        assert!(matches!(
            WorkerAdvert::from_json(key, &a.to_json().unwrap()),
            Err(AdvertError::Endpoint(_))
        ));
        a = sample("w1");
        a.capacity.free_kv_tokens = 10_000;
        assert!(matches!(
            WorkerAdvert::from_json(key, &a.to_json().unwrap()),
            Err(AdvertError::Capacity(_))
        ));
        a = sample("w1");
        a.schema = 99;
        assert_eq!(
            WorkerAdvert::from_json(key, &a.to_json().unwrap()),
            Err(AdvertError::Schema(99))
        );
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn as_str_matches_the_json_names() {
        for s in [
            WorkerState::Starting,
            WorkerState::Ready,
            WorkerState::Draining,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        for k in [
            DeviceKind::Cpu,
            DeviceKind::Gpu,
            DeviceKind::IntegratedGpu,
            DeviceKind::Accelerator,
            DeviceKind::Unknown,
        ] {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
    }
}
