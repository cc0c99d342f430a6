//! Memory planning from a GGUF tensor table: how many bytes of weights and KV cache land on the
//! GPU and in host memory for a given expert placement, without loading any weights.

use crate::gguf::GgufHeader;

/// Accelerator bytes a llama.cpp process holds beyond weights, KV cache and compute buffers:
/// the CUDA context, cuBLAS handles and workspaces, memory pools. Measured 608–646 MiB per
/// worker process on an H200 with CUDA 13 (the advert's `overhead_bytes`; see
/// docs/benchmarks/gpu.md). `--offload auto` and `moectl plan` keep it free when fitting a budget.
pub const ACCELERATOR_OVERHEAD_BYTES: u64 = 640 << 20;

/// Tokens per llama.cpp micro-batch the compute buffers are sized for (the worker's n_ubatch is
/// min(--batch-size, 512)).
pub const UBATCH_TOKENS: u64 = 512;

/// Bytes per device class for one placement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Layers whose routed experts stay in host memory (the first `n_cpu_moe` layers).
    pub n_cpu_moe: u32,
    /// Weight bytes on the accelerator (with no accelerator, see `total_weight_bytes`).
    pub device_weight_bytes: u64,
    /// Weight bytes kept in host memory because of the expert placement.
    pub host_expert_bytes: u64,
    /// The input token embeddings, which llama.cpp always keeps in host memory (a row lookup
    /// needs no accelerator); a model whose output projection is tied to them also gets a copy
    /// on the accelerator, counted in `device_weight_bytes`.
    pub host_input_bytes: u64,
    /// KV cache bytes (F16 K and V for every layer and context cell).
    pub kv_bytes: u64,
    /// Accelerator compute buffers llama.cpp reserves for one micro-batch (logits and
    /// activations), estimated.
    pub compute_bytes: u64,
    /// Tensor bytes of the whole file.
    pub total_weight_bytes: u64,
}

impl MemoryPlan {
    /// Accelerator bytes of weights, KV and compute buffers (the process overhead comes on top).
    pub fn device_bytes(&self) -> u64 {
        self.device_weight_bytes + self.kv_bytes + self.compute_bytes
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
    /// Bytes of `token_embd.weight`.
    pub input_embedding_bytes: u64,
    /// No `output.weight`: the output projection reuses the input embeddings.
    pub tied_output: bool,
    pub n_vocab: u64,
    pub n_embd: u64,
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
        let (mut input, mut n_vocab, mut has_output) = (0, 0, false);
        for t in &h.tensors {
            let bytes = t.n_bytes().unwrap_or(0);
            total += bytes;
            if t.is_routed_expert()
                && let Some(l) = t.layer().filter(|&l| l < n_layer)
            {
                expert_bytes_per_layer[l as usize] += bytes;
            }
            match t.name.as_str() {
                "token_embd.weight" => {
                    input = bytes;
                    n_vocab = t.dims.get(1).copied().unwrap_or(0);
                }
                "output.weight" => has_output = true,
                _ => {}
            }
        }
        ModelShape {
            n_layer,
            expert_count: h.arch_u64("expert_count").unwrap_or(0) as u32,
            expert_used_count: h.arch_u64("expert_used_count").unwrap_or(0) as u32,
            kv_elements_per_token_layer: n_head_kv * (k_len + v_len),
            expert_bytes_per_layer,
            total_weight_bytes: total,
            input_embedding_bytes: input,
            tied_output: !has_output,
            n_vocab,
            n_embd,
        }
    }

    /// KV bytes for `ctx` cells of F16 K and V.
    pub fn kv_bytes(&self, ctx: u32) -> u64 {
        ctx as u64 * self.n_layer as u64 * self.kv_elements_per_token_layer * 2
    }

    /// Accelerator compute buffers for a micro-batch: F32 logits over the vocabulary plus
    /// activations (about 24 F32 vectors of the embedding width per token). Within 1 % of what
    /// llama.cpp reserved for the synthetic gpt-oss-20b (532 MiB measured, 528 predicted).
    pub fn compute_bytes(&self) -> u64 {
        UBATCH_TOKENS * 4 * (self.n_vocab + 24 * self.n_embd)
    }

    /// The plan with the routed experts of the first `n_cpu_moe` layers in host memory.
    pub fn plan(&self, n_cpu_moe: u32, ctx: u32) -> MemoryPlan {
        let n = n_cpu_moe.min(self.n_layer);
        let host: u64 = self.expert_bytes_per_layer[..n as usize].iter().sum();
        let tied_copy = if self.tied_output {
            self.input_embedding_bytes
        } else {
            0
        };
        MemoryPlan {
            n_cpu_moe: n,
            device_weight_bytes: (self.total_weight_bytes - host)
                .saturating_sub(self.input_embedding_bytes)
                + tied_copy,
            host_expert_bytes: host,
            host_input_bytes: self.input_embedding_bytes,
            kv_bytes: self.kv_bytes(ctx),
            compute_bytes: self.compute_bytes(),
            total_weight_bytes: self.total_weight_bytes,
        }
    }

    /// The fastest placement that fits `budget` accelerator bytes (fewest host expert layers),
    /// keeping `overhead` bytes for the process's CUDA context and pools on top of weights, KV
    /// and compute buffers. None if even `cpu-moe` does not fit.
    pub fn fit(&self, budget: u64, overhead: u64, ctx: u32) -> Option<MemoryPlan> {
        (0..=self.n_layer)
            .map(|n| self.plan(n, ctx))
            .find(|p| p.device_bytes() + overhead <= budget)
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
            input_embedding_bytes: 0,
            tied_output: false,
            n_vocab: 0,
            n_embd: 0,
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
        // KV = 20480 for ctx 10; weights 500 with 0 offloaded; no compute buffers (n_vocab 0).
        assert_eq!(s.fit(20480 + 500, 0, 10).unwrap().n_cpu_moe, 0);
        assert_eq!(s.fit(20480 + 350, 0, 10).unwrap().n_cpu_moe, 2);
        assert_eq!(s.fit(20480 + 100, 0, 10).unwrap().n_cpu_moe, 4);
        assert!(s.fit(20480 + 99, 0, 10).is_none());
    }

    #[test]
    fn input_embeddings_stay_on_the_host_with_a_device_copy_when_tied() {
        let mut s = shape();
        s.input_embedding_bytes = 40;
        let p = s.plan(0, 10);
        assert_eq!(p.host_input_bytes, 40);
        assert_eq!(p.device_weight_bytes, 460, "separate output projection");
        s.tied_output = true;
        assert_eq!(
            s.plan(0, 10).device_weight_bytes,
            500,
            "tied: the output copy"
        );
    }

    #[test]
    fn compute_buffers_count_against_the_budget() {
        let mut s = shape();
        s.n_vocab = 10;
        s.n_embd = 1;
        let compute = UBATCH_TOKENS * 4 * 34;
        assert_eq!(s.plan(0, 10).compute_bytes, compute);
        assert_eq!(s.fit(20480 + 500 + compute, 0, 10).unwrap().n_cpu_moe, 0);
        assert_eq!(s.fit(20480 + 499 + compute, 0, 10).unwrap().n_cpu_moe, 1);
        assert_eq!(
            s.fit(20480 + 500 + compute + 7, 7, 10).unwrap().n_cpu_moe,
            0
        );
    }
}
