//! Offload profiles: where a worker keeps the routed-expert weights of an MoE model.

use std::fmt;
use std::str::FromStr;

/// `full`, `cpu-moe`, `n-cpu-moe:N` or `auto` (the planner picks N for a VRAM budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OffloadProfile {
    /// Every tensor on the GPU.
    Full,
    /// Every routed-expert tensor in host memory (llama.cpp `--cpu-moe`).
    CpuMoe,
    /// The routed experts of the first N layers in host memory (llama.cpp `--n-cpu-moe N`).
    NCpuMoe(u32),
    /// Chosen at start-up from the GGUF tensor table and `--vram-budget`.
    Auto,
}

impl OffloadProfile {
    /// The profile's mode without its count: `full`, `cpu-moe`, `n-cpu-moe`, `auto`.
    pub fn mode(&self) -> &'static str {
        match self {
            OffloadProfile::Full => "full",
            OffloadProfile::CpuMoe => "cpu-moe",
            OffloadProfile::NCpuMoe(_) => "n-cpu-moe",
            OffloadProfile::Auto => "auto",
        }
    }

    /// Layers whose experts live in host memory, for a model of `n_layer` layers.
    pub fn n_cpu_moe(&self, n_layer: u32) -> u32 {
        match *self {
            OffloadProfile::Full | OffloadProfile::Auto => 0,
            OffloadProfile::CpuMoe => n_layer,
            OffloadProfile::NCpuMoe(n) => n.min(n_layer),
        }
    }

    /// Whether this profile keeps any experts on the GPU (the fast pool).
    pub fn is_full(&self) -> bool {
        matches!(self, OffloadProfile::Full)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid offload profile {0:?}: expected full, cpu-moe, n-cpu-moe:N (N >= 1) or auto")]
pub struct ParseOffloadError(String);

impl FromStr for OffloadProfile {
    type Err = ParseOffloadError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "full" => Ok(OffloadProfile::Full),
            "cpu-moe" => Ok(OffloadProfile::CpuMoe),
            "auto" => Ok(OffloadProfile::Auto),
            _ => s
                .strip_prefix("n-cpu-moe:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|&n| n > 0)
                .map(OffloadProfile::NCpuMoe)
                .ok_or_else(|| ParseOffloadError(s.to_string())),
        }
    }
}

impl fmt::Display for OffloadProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffloadProfile::NCpuMoe(n) => write!(f, "n-cpu-moe:{n}"),
            other => f.write_str(other.mode()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_profile() {
        for s in ["full", "cpu-moe", "n-cpu-moe:12", "auto"] {
            assert_eq!(s.parse::<OffloadProfile>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_unknown_profiles() {
        for s in [
            "",
            "gpu",
            "n-cpu-moe",
            "n-cpu-moe:0",
            "n-cpu-moe:-1",
            "n-cpu-moe:x",
        ] {
            assert!(s.parse::<OffloadProfile>().is_err(), "{s}");
        }
    }

    #[test]
    fn counts_host_layers() {
        assert_eq!(OffloadProfile::CpuMoe.n_cpu_moe(24), 24);
        assert_eq!(OffloadProfile::NCpuMoe(30).n_cpu_moe(24), 24);
        assert_eq!(OffloadProfile::Full.n_cpu_moe(24), 0);
    }
}
