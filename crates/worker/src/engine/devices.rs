//! Device memory accounting: the ggml devices with their planned and measured weight, KV and
//! compute bytes, refreshed from ggml (free/total) and from NVML (this process's bytes on each
//! GPU as the driver reports them, the figure behind `nvidia-smi`). NVML is loaded at run time:
//! builds and hosts without NVIDIA's driver are unaffected.

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::OnceLock;

use llama_cpp_2::{LlamaBackendDeviceType, list_llama_ggml_backend_devices};
use moe_common::plan::MemoryPlan;
use moe_common::registry::{DeviceInfo, DeviceKind};
use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

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
pub(super) fn planned_devices(plan: &MemoryPlan) -> Vec<DeviceInfo> {
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
pub(super) fn free_by_device() -> HashMap<String, u64> {
    list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| (d.name, d.memory_free as u64))
        .collect()
}

/// Replaces planned bytes on accelerators by what llama.cpp took from their free memory: weights
/// are what loading the model took, compute buffers what creating and warming up the context
/// took beyond the KV cache. Host memory is shared with everything else on the machine, so host
/// devices keep the planned figures. Call with nothing else allocating on the devices meanwhile.
pub(super) fn account(
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
pub(super) fn refresh_devices(devices: &mut [DeviceInfo]) {
    let now = list_llama_ggml_backend_devices();
    for d in devices.iter_mut() {
        if let Some(n) = now.iter().find(|n| n.name == d.name) {
            d.total_bytes = n.memory_total as u64;
            d.free_bytes = n.memory_free as u64;
        }
        if d.kind == DeviceKind::Cpu {
            continue;
        }
        d.process_bytes = pci_bus_id(&d.name).and_then(|id| process_bytes(&id));
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
pub(super) fn accelerator_pins_host_weights() -> bool {
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

/// Row-invariant kernels of moe-cluster's llama.cpp patches (patches/llama.cpp): while on, each
/// row of a call is computed exactly as it would be alone, so the one-token-per-sequence calls
/// of `--decode-mode grouped` are batch-invariant. CUDA's (patch 0001, for calls of up to
/// `rows` rows) and the CPU's (patch 0002) are found through the ggml backend registry
/// (`ggml_backend_cuda_set_batch_invariant`, `ggml_backend_cpu_set_batch_invariant`). The
/// switches are global to the process, silent and cheap: the engine turns them on for calls of
/// decodes and off for prompt chunks, which then take the usual multi-row kernels (a prompt is
/// prefilled alone, at fixed chunk boundaries, so those stay deterministic) instead of running
/// row by row.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct InvariantKernels {
    cuda: Option<Switch>,
    /// Whether CUDA's mode also keeps ops on host-resident weights on the host while on
    /// (`ggml_backend_cuda_batch_invariant_version` ≥ 2): see [`Self::cuda_keeps_host_ops`].
    cuda_keeps_host_ops: bool,
    cpu: Option<Switch>,
}

/// One backend's setter and the value that turns it on (0 turns it off).
#[derive(Clone, Copy, Debug)]
struct Switch {
    set: unsafe extern "C" fn(i32),
    on: i32,
}

impl Switch {
    /// The setter `proc` of the registry `reg`, if this build has it.
    fn find(reg: &std::ffi::CStr, proc: &std::ffi::CStr, on: i32) -> Option<Self> {
        backend_proc(reg, proc).map(|f| Self {
            // SAFETY: the patches declare the function `void (int)`, the type the pointer is
            // converted to, and it only sets the backend's flag.
            set: unsafe {
                std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn(i32)>(f)
            },
            on,
        })
    }

    fn switch(&self, on: bool) {
        // SAFETY: `set` is a patch's `void (int)` setter found in `find`.
        unsafe { (self.set)(if on { self.on } else { 0 }) }
    }
}

impl InvariantKernels {
    /// The switches this build has, all off: CUDA's for calls of up to `cuda_rows` rows when
    /// given, the CPU's when `cpu`.
    pub(super) fn find(cuda_rows: Option<i32>, cpu: bool) -> Self {
        let cuda = cuda_rows
            .and_then(|rows| Switch::find(c"CUDA", c"ggml_backend_cuda_set_batch_invariant", rows));
        Self {
            cuda,
            cuda_keeps_host_ops: cuda.is_some() && cuda_batch_invariant_version() >= 2,
            cpu: cpu
                .then(|| Switch::find(c"CPU", c"ggml_backend_cpu_set_batch_invariant", 1))
                .flatten(),
        }
    }

    /// Switches off every mode this build has, whatever this worker uses. The flags are global
    /// to the process and outlive an engine: another engine of the same process (in-process
    /// test workers run one after another) may have left them on after its last decode call,
    /// and a context created, or a prompt run, with them on computes other last bits (seen in
    /// the e2e tests: a `grouped` worker's first prompt after another's decodes differed from
    /// its later ones in the last bits of its log-probabilities).
    pub(super) fn reset_all() {
        let cuda = Switch::find(c"CUDA", c"ggml_backend_cuda_set_batch_invariant", 0);
        let cpu = Switch::find(c"CPU", c"ggml_backend_cpu_set_batch_invariant", 0);
        for s in [cuda, cpu].iter().flatten() {
            s.switch(false);
        }
    }

    pub(super) fn cuda(&self) -> bool {
        self.cuda.is_some()
    }

    /// Whether, with CUDA's mode on, ops on host-resident weights stay on the host whatever the
    /// call's row count. llama.cpp otherwise offloads an op on host weights to the GPU from a
    /// batch size of 32, which for a MoE expert bias (`ADD_ID`) is tokens × experts used: 8
    /// decodes of gpt-oss's 4 experts moved the bias, and the ops after it, onto the GPU, whose
    /// kernels differ from the CPU's in the last bits, while a lone decode stayed on the host
    /// (patch 0001, version 2).
    pub(super) fn cuda_keeps_host_ops(&self) -> bool {
        self.cuda_keeps_host_ops
    }

    pub(super) fn cpu(&self) -> bool {
        self.cpu.is_some()
    }

    /// On or off, for the calls that follow. Only between llama.cpp calls: the flags are read
    /// while a call's graph runs. Leave them off while the context is created: its compute
    /// buffers are then reserved for a prompt chunk as it runs (with op offload, which CUDA's
    /// mode stops while on).
    pub(super) fn switch(&self, on: bool) {
        for s in [self.cuda, self.cpu].iter().flatten() {
            s.switch(on);
        }
    }
}

/// What this build's CUDA batch-invariant mode covers (patch 0001's
/// `ggml_backend_cuda_batch_invariant_version`): 2 = the row-invariant kernels and no op offload
/// while on; 1 = the kernels only (a build of the patch before that proc).
fn cuda_batch_invariant_version() -> i32 {
    backend_proc(c"CUDA", c"ggml_backend_cuda_batch_invariant_version").map_or(1, |f| {
        // SAFETY: the patch declares the function `int (void)`, a pure getter.
        unsafe { std::mem::transmute::<*mut std::ffi::c_void, unsafe extern "C" fn() -> i32>(f)() }
    })
}

/// The proc `name` of the ggml backend registry `reg`, if this build has both.
fn backend_proc(reg: &std::ffi::CStr, name: &std::ffi::CStr) -> Option<*mut std::ffi::c_void> {
    // SAFETY: both names are NUL-terminated; registries and their procs live as long as the
    // process.
    unsafe {
        let reg = llama_cpp_sys_2::ggml_backend_reg_by_name(reg.as_ptr());
        if reg.is_null() {
            return None;
        }
        let f = llama_cpp_sys_2::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        (!f.is_null()).then_some(f)
    }
}

/// Whether this build's ggml-cpu uses the instruction set on which the CPU patch's row
/// invariance (0002) was verified end to end: x86 with AVX2 and without AVX-512 (bit-equal rows
/// with bench/cpu-invariance-probe.cpp on two models, the e2e tests, and on an H200 host a
/// `cpu-moe` worker with this CPU backend: 8/8, 16/16, 8/8 concurrent runs equal to solo;
/// docs/benchmarks/gpu.md, eighth run; the images' default `x86-64-v3`). An AVX-512/AMX build
/// passed the probe on one model (gpt-oss-like, 1 vs 8 and 3 vs 8 rows, CPU only and with the
/// experts on the host of an H200), which is not yet enough to claim it. (The H200's earlier
/// 0/16 `cpu-moe` runs came from llama.cpp's op offload, not from these kernels:
/// [`InvariantKernels::cuda_keeps_host_ops`].) Compile-time flags of the library, not the host's.
pub(super) fn cpu_invariance_verified() -> bool {
    // SAFETY: plain queries of ggml-cpu's build flags, no arguments.
    unsafe {
        llama_cpp_sys_2::ggml_cpu_has_avx2() != 0 && llama_cpp_sys_2::ggml_cpu_has_avx512() == 0
    }
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

// NVML: this process's memory on a GPU as the driver reports it.

fn nvml() -> Option<&'static Nvml> {
    static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
    NVML.get_or_init(|| match Nvml::init() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::debug!(error = %e, "NVML not available; per-process GPU memory not reported");
            None
        }
    })
    .as_ref()
}

/// Bytes of device memory this process uses on the GPU at `pci_bus_id` (as ggml reports it,
/// e.g. `0000:c1:00.0`), or None when NVML, the device or the process entry is not there.
fn process_bytes(pci_bus_id: &str) -> Option<u64> {
    let nvml = nvml()?;
    let want = normalise_bus_id(pci_bus_id);
    let count = nvml.device_count().ok()?;
    let device = (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok())
        .find(|d| {
            d.pci_info()
                .is_ok_and(|p| normalise_bus_id(&p.bus_id) == want)
        })?;
    let pid = std::process::id();
    device
        .running_compute_processes()
        .ok()?
        .into_iter()
        .find(|p| p.pid == pid)
        .and_then(|p| match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        })
}

/// PCI bus ids compare equal whatever the width of the domain and the case of the hex digits:
/// NVML writes `00000000:C1:00.0`, ggml `0000:c1:00.0`.
fn normalise_bus_id(id: &str) -> String {
    let id = id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) => {
            let domain = domain.trim_start_matches('0');
            format!("{}:{rest}", if domain.is_empty() { "0" } else { domain })
        }
        None => id,
    }
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

    #[test]
    fn bus_ids_from_nvml_and_ggml_compare_equal() {
        assert_eq!(
            normalise_bus_id("00000000:C1:00.0"),
            normalise_bus_id("0000:c1:00.0")
        );
        assert_ne!(
            normalise_bus_id("00000000:C1:00.0"),
            normalise_bus_id("0000:c2:00.0")
        );
    }
}
