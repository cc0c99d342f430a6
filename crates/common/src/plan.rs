//! Memory planning from a GGUF tensor table: how many bytes of weights and KV cache land on the
//! GPU and in host memory for a given expert placement, without loading any weights.

use crate::gguf::GgufHeader;

/// Accelerator bytes `--offload auto` and `moectl plan` keep free for llama.cpp's compute
/// buffers and the CUDA context when fitting a budget (measured on the H100 with the synthetic
/// gpt-oss-20b: see docs/benchmarks/gpu.md).
pub const AUTO_RESERVE_BYTES: u64 = 768 << 20;

/// Bytes per device class for one placement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Layers whose routed experts stay in host memory (the first `n_cpu_moe` layers).
    pub n_cpu_moe: u32,
    /// Weight bytes on the accelerator (all weights when no accelerator is used).
    pub device_weight_bytes: u64,
    /// Weight bytes kept in host memory because of the expert placement.
    pub host_expert_bytes: u64,
    /// KV cache bytes (F16 K and V for every layer and context cell).
    pub kv_bytes: u64,
}

impl MemoryPlan {
    /// Accelerator bytes: weights and KV (compute buffers come on top).
    pub fn device_bytes(&self) -> u64 {
        self.device_weight_bytes + self.kv_bytes
    }
}

/// The model facts planning needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub n_layer: u32,
    pub expert_count: u32,
    pub expert_used_count: u32,
    /// K plus V elements per token and layer.
    pub kv_elements_per_token_layer: u64,
    /// Bytes of routed experts per layer.
    pub expert_bytes_per_layer: Vec<u64>,
    pub total_weight_bytes: u64,
}

impl ModelShape {
    pub fn from_gguf(h: &GgufHeader) -> Self {
        let n_layer = h.arch_u64("block_count").unwrap_or(0) as u32;
        let n_embd = h.arch_u64("embedding_length").unwrap_or(0);
        let n_head = h.arch_u64("attention.head_count").unwrap_or(1).max(1);
        let n_head_kv = h.arch_u64("attention.head_count_kv").unwrap_or(n_head);
        let k_len = h
            .arch_u64("attention.key_length")
            .unwrap_or(n_embd / n_head);
        let v_len = h
            .arch_u64("attention.value_length")
            .unwrap_or(n_embd / n_head);
        let mut expert_bytes_per_layer = vec![0u64; n_layer as usize];
        let mut total = 0;
        for t in &h.tensors {
            let bytes = t.n_bytes().unwrap_or(0);
            total += bytes;
            if t.is_routed_expert()
                && let Some(l) = t.layer().filter(|&l| l < n_layer)
            {
                expert_bytes_per_layer[l as usize] += bytes;
            }
        }
        ModelShape {
            n_layer,
            expert_count: h.arch_u64("expert_count").unwrap_or(0) as u32,
            expert_used_count: h.arch_u64("expert_used_count").unwrap_or(0) as u32,
            kv_elements_per_token_layer: n_head_kv * (k_len + v_len),
            expert_bytes_per_layer,
            total_weight_bytes: total,
        }
    }

    /// KV bytes for `ctx` cells of F16 K and V.
    pub fn kv_bytes(&self, ctx: u32) -> u64 {
        ctx as u64 * self.n_layer as u64 * self.kv_elements_per_token_layer * 2
    }

    /// The plan with the routed experts of the first `n_cpu_moe` layers in host memory.
    pub fn plan(&self, n_cpu_moe: u32, ctx: u32) -> MemoryPlan {
        let n = n_cpu_moe.min(self.n_layer);
        let host: u64 = self.expert_bytes_per_layer[..n as usize].iter().sum();
        MemoryPlan {
            n_cpu_moe: n,
            device_weight_bytes: self.total_weight_bytes - host,
            host_expert_bytes: host,
            kv_bytes: self.kv_bytes(ctx),
        }
    }

    /// The fastest placement that fits `budget` accelerator bytes (fewest host expert layers),
    /// keeping `reserve` bytes for compute buffers and the CUDA context. None if even
    /// `cpu-moe` does not fit.
    pub fn fit(&self, budget: u64, reserve: u64, ctx: u32) -> Option<MemoryPlan> {
        (0..=self.n_layer)
            .map(|n| self.plan(n, ctx))
            .find(|p| p.device_bytes() + reserve <= budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ModelShape {
        ModelShape {
            n_layer: 4,
            expert_count: 8,
            expert_used_count: 2,
            kv_elements_per_token_layer: 256,
            expert_bytes_per_layer: vec![100, 100, 100, 100],
            total_weight_bytes: 500,
        }
    }

    #[test]
    fn plans_host_experts_for_the_first_layers() {
        let p = shape().plan(3, 10);
        assert_eq!(p.host_expert_bytes, 300);
        assert_eq!(p.device_weight_bytes, 200);
        assert_eq!(p.kv_bytes, 10 * 4 * 256 * 2);
    }

    #[test]
    fn fit_picks_the_fewest_host_layers_that_fit() {
        let s = shape();
        // KV = 20480 for ctx 10; weights 500 with 0 offloaded.
        assert_eq!(s.fit(20480 + 500, 0, 10).unwrap().n_cpu_moe, 0);
        assert_eq!(s.fit(20480 + 350, 0, 10).unwrap().n_cpu_moe, 2);
        assert_eq!(s.fit(20480 + 100, 0, 10).unwrap().n_cpu_moe, 4);
        assert!(s.fit(20480 + 99, 0, 10).is_none());
    }
}
