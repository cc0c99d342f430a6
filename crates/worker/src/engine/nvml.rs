//! This process's memory on a GPU as the driver reports it, through NVML (the library behind
//! `nvidia-smi`), loaded at run time: builds and hosts without NVIDIA's driver are unaffected.

use std::sync::OnceLock;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

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
pub fn process_bytes(pci_bus_id: &str) -> Option<u64> {
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
    use super::normalise_bus_id;

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
