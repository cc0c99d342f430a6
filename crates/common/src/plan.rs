//! Memory planning from a GGUF tensor table: how many bytes of weights and KV cache land on the
//! GPU and in host memory for a given expert placement, without loading any weights.

use crate::gguf::GgufHeader;

/// Accelerator bytes a llama.cpp process holds beyond weights, KV cache and compute buffers:
/// the CUDA context, cuBLAS handles and workspaces, memory pools. Measured 608–646 MiB per
/// worker process on an H200 with CUDA 13 (the advert's `overhead_bytes`; see
/// docs/benchmarks/gpu.md). `--offload auto` and `moectl plan` keep it free when fitting a budget.
pub const ACCELERATOR_OVERHEAD_BYTES: u64 = 640 << 20;

/// Tokens per llama.cpp micro-batch by default (the worker's `--ubatch-size` defaults to
/// min(--batch-size, 512)); compute buffers and sliding-window KV are sized for one micro-batch.
pub const UBATCH_TOKENS: u64 = 512;

/// Element type of the KV cache (llama.cpp's `type_k` / `type_v`; llama-server's
/// `--cache-type-k` / `--cache-type-v`, with the same names). F16 is llama.cpp's default; the
/// 8-bit and 4-bit block types roughly halve or quarter KV memory at some cost in fidelity, and
/// a quantized V cache needs flash attention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvCacheType {
    F32,
    #[default]
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Iq4Nl,
    Q5_0,
    Q5_1,
}

/// A KV cache type name that is not one of [`KvCacheType::ALL`].
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown KV cache type {0:?} (one of f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1)"
)]
pub struct UnknownKvCacheType(String);

impl KvCacheType {
    pub const ALL: [KvCacheType; 9] = [
        KvCacheType::F32,
        KvCacheType::F16,
        KvCacheType::Bf16,
        KvCacheType::Q8_0,
        KvCacheType::Q4_0,
        KvCacheType::Q4_1,
        KvCacheType::Iq4Nl,
        KvCacheType::Q5_0,
        KvCacheType::Q5_1,
    ];

    /// The name on the command line, in the advert and in llama-server's flags.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheType::F32 => "f32",
            KvCacheType::F16 => "f16",
            KvCacheType::Bf16 => "bf16",
            KvCacheType::Q8_0 => "q8_0",
            KvCacheType::Q4_0 => "q4_0",
            KvCacheType::Q4_1 => "q4_1",
            KvCacheType::Iq4Nl => "iq4_nl",
            KvCacheType::Q5_0 => "q5_0",
            KvCacheType::Q5_1 => "q5_1",
        }
    }

    /// (elements per block, bytes per block), as ggml lays the type out.
    fn block(self) -> (u64, u64) {
        match self {
            KvCacheType::F32 => (1, 4),
            KvCacheType::F16 | KvCacheType::Bf16 => (1, 2),
            KvCacheType::Q8_0 => (32, 34),
            KvCacheType::Q4_0 | KvCacheType::Iq4Nl => (32, 18),
            KvCacheType::Q4_1 => (32, 20),
            KvCacheType::Q5_0 => (32, 22),
            KvCacheType::Q5_1 => (32, 24),
        }
    }

    /// Bytes of one row of `elements` values (ggml's `ggml_row_size`).
    pub fn row_bytes(self, elements: u64) -> u64 {
        let (per_block, bytes) = self.block();
        elements.div_ceil(per_block) * bytes
    }

    /// Whether values are stored exactly as the model computes them (F32, F16, BF16), not
    /// quantized to blocks.
    pub fn is_float(self) -> bool {
        self.block().0 == 1
    }
}

impl std::fmt::Display for KvCacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KvCacheType {
    type Err = UnknownKvCacheType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        KvCacheType::ALL
            .into_iter()
            .find(|t| t.as_str() == lower)
            .ok_or_else(|| UnknownKvCacheType(s.to_string()))
    }
}

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
    /// KV cache bytes (K and V of the layout's cache types for every layer's cells;
    /// sliding-window layers hold only their window, see [`KvLayout`]).
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

/// How a context lays out its KV cells: what the worker passes to llama.cpp (`n_ctx`,
/// `n_seq_max`, `kv_unified`, `n_ubatch`, and `swa_full = false`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Cells asked for (`n_ctx`); llama.cpp rounds up to a multiple of 256.
    pub cells: u32,
    /// KV sequences (`n_seq_max`): each has its own stream of `cells / sequences` cells unless
    /// `unified`.
    pub sequences: u32,
    /// One stream shared by all sequences.
    pub unified: bool,
    /// Tokens per micro-batch (`n_ubatch`); sliding-window layers keep room for one.
    pub ubatch: u32,
    /// Sliding-window layers get full-size KV too (llama.cpp's `swa_full`; the worker sets it
    /// false, as llama-server does).
    pub swa_full: bool,
    /// Most sampled positions per decode call (llama.cpp's `n_outputs_max`; 0: a whole
    /// micro-batch, llama.cpp's default). The compute buffers hold logits for
    /// min(ubatch, this) rows; the worker sets one per KV stream.
    pub outputs_max: u32,
    /// Element types of the K and V caches (`--cache-type-k`, `--cache-type-v`).
    pub type_k: KvCacheType,
    pub type_v: KvCacheType,
}

/// llama.cpp pads context sizes and sliding-window caches to this many cells.
const KV_PAD: u64 = 256;

fn pad(n: u64) -> u64 {
    n.div_ceil(KV_PAD) * KV_PAD
}

impl KvLayout {
    /// `cells` with full-size KV on every layer, however they are split into streams: the upper
    /// bound, what [`ModelShape::plan`] and [`ModelShape::fit`] assume.
    pub fn full_size(cells: u32) -> Self {
        KvLayout {
            cells,
            sequences: 1,
            unified: true,
            ubatch: UBATCH_TOKENS as u32,
            swa_full: true,
            outputs_max: 0,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
        }
    }

    /// (streams, cells per stream of a full-attention layer, cells per stream of a sliding-window
    /// layer with window `n_swa`), as llama.cpp sizes them: `n_ctx` padded to 256; per stream
    /// `n_ctx / n_seq_max` padded to 256 (one stream when unified); a sliding-window layer
    /// `min(n_ctx_seq, n_swa × (n_seq_max when unified, else 1) + n_ubatch)` padded to 256, or
    /// `n_ctx_seq` with `swa_full` (llama-context.cpp, llama-kv-cache-iswa.cpp).
    pub fn cells_per_stream(&self, n_swa: u32) -> (u64, u64, u64) {
        let n_ctx = pad(self.cells as u64);
        let sequences = self.sequences.max(1) as u64;
        let (streams, full) = if self.unified {
            (1, n_ctx)
        } else {
            (sequences, pad(n_ctx / sequences))
        };
        let windows = if self.unified { sequences } else { 1 };
        let swa = if self.swa_full {
            full
        } else {
            pad(full.min(n_swa as u64 * windows + self.ubatch as u64))
        };
        (streams, full, swa)
    }
}

/// The model facts planning needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelShape {
    pub n_layer: u32,
    pub expert_count: u32,
    pub expert_used_count: u32,
    /// K elements per token and layer (`n_head_kv × key_length`): one row of the K cache.
    pub k_elements_per_token_layer: u64,
    /// V elements per token and layer (`n_head_kv × value_length`).
    pub v_elements_per_token_layer: u64,
    /// Bytes of routed experts per layer.
    pub expert_bytes_per_layer: Vec<u64>,
    pub total_weight_bytes: u64,
    /// Bytes of `token_embd.weight`.
    pub input_embedding_bytes: u64,
    /// No `output.weight`: the output projection reuses the input embeddings.
    pub tied_output: bool,
    pub n_vocab: u64,
    pub n_embd: u64,
    /// Sliding-window attention: the window in tokens (GGUF `<arch>.attention.sliding_window`)
    /// and how many layers use it (the architecture's layer pattern). 0 and 0 without it.
    pub n_swa: u32,
    pub swa_layers: u32,
}

/// Layers of `n_layer` that use the sliding window, for the architectures whose llama.cpp
/// implementation has sliding-window layers that we model: gpt-oss alternates them with full
/// layers (pattern 2: layers 0, 2, 4, … slide; `<arch>.attention.sliding_window_pattern` when the
/// file sets it as a number). Others are planned with full-size KV on every layer, which can only
/// overstate.
fn sliding_window_layers(h: &GgufHeader, n_layer: u32) -> u32 {
    let default_pattern = match h.architecture() {
        Some("gpt-oss") => 2,
        _ => return 0,
    };
    let pattern = h
        .arch_u64("attention.sliding_window_pattern")
        .unwrap_or(default_pattern) as u32;
    // llama_hparams::set_swa_pattern (dense_first = false): layer il slides when
    // il % pattern < pattern - 1; pattern 0 makes every layer slide.
    (0..n_layer)
        .filter(|il| pattern == 0 || il % pattern < pattern - 1)
        .count() as u32
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
        let n_swa = h.arch_u64("attention.sliding_window").unwrap_or(0) as u32;
        let swa_layers = if n_swa == 0 {
            0
        } else {
            sliding_window_layers(h, n_layer)
        };
        ModelShape {
            n_layer,
            expert_count: h.arch_u64("expert_count").unwrap_or(0) as u32,
            expert_used_count: h.arch_u64("expert_used_count").unwrap_or(0) as u32,
            k_elements_per_token_layer: n_head_kv * k_len,
            v_elements_per_token_layer: n_head_kv * v_len,
            expert_bytes_per_layer,
            total_weight_bytes: total,
            input_embedding_bytes: input,
            tied_output: !has_output,
            n_vocab,
            n_embd,
            n_swa,
            swa_layers,
        }
    }

    /// KV bytes for `ctx` cells of F16 K and V on every layer ([`KvLayout::full_size`]).
    pub fn kv_bytes(&self, ctx: u32) -> u64 {
        self.kv_bytes_for(&KvLayout::full_size(ctx))
    }

    /// KV bytes as llama.cpp allocates them for `kv`: full-attention layers hold every cell,
    /// sliding-window layers a window and a micro-batch per stream; each cell is one K row and
    /// one V row of the layout's cache types.
    pub fn kv_bytes_for(&self, kv: &KvLayout) -> u64 {
        let swa_layers = self.swa_layers.min(self.n_layer) as u64;
        let full_layers = self.n_layer as u64 - swa_layers;
        let (streams, full, swa) = kv.cells_per_stream(self.n_swa);
        let cells = streams * (full_layers * full + swa_layers * swa);
        cells
            * (kv.type_k.row_bytes(self.k_elements_per_token_layer)
                + kv.type_v.row_bytes(self.v_elements_per_token_layer))
    }

    /// Accelerator compute buffers for a micro-batch of [`UBATCH_TOKENS`] with logits for every
    /// token ([`Self::compute_bytes_for`]).
    pub fn compute_bytes(&self) -> u64 {
        self.compute_bytes_for(&KvLayout::full_size(0))
    }

    /// Accelerator compute buffers for a micro-batch of `kv.ubatch` tokens: F32 logits over the
    /// vocabulary for the rows that can be sampled (min(ubatch, `kv.outputs_max`), all of them
    /// when 0) plus activations (about 24 F32 vectors of the embedding width per token). Within
    /// 1 % of what llama.cpp reserved for the synthetic gpt-oss-20b at 512 tokens with logits
    /// for all of them (532 MiB measured, 528 predicted).
    pub fn compute_bytes_for(&self, kv: &KvLayout) -> u64 {
        let ubatch = kv.ubatch.max(1) as u64;
        let rows = match kv.outputs_max {
            0 => ubatch,
            n => ubatch.min(n as u64),
        };
        4 * (rows * self.n_vocab + ubatch * 24 * self.n_embd)
    }

    /// The plan with the routed experts of the first `n_cpu_moe` layers in host memory, with
    /// full-size KV for `ctx` cells on every layer (an upper bound for sliding-window models;
    /// [`Self::plan_for`] is exact).
    pub fn plan(&self, n_cpu_moe: u32, ctx: u32) -> MemoryPlan {
        self.plan_for(n_cpu_moe, &KvLayout::full_size(ctx))
    }

    /// [`Self::plan`] for the KV layout `kv`.
    pub fn plan_for(&self, n_cpu_moe: u32, kv: &KvLayout) -> MemoryPlan {
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
            kv_bytes: self.kv_bytes_for(kv),
            compute_bytes: self.compute_bytes_for(kv),
            total_weight_bytes: self.total_weight_bytes,
        }
    }

    /// The fastest placement that fits `budget` accelerator bytes (fewest host expert layers),
    /// keeping `overhead` bytes for the process's CUDA context and pools on top of weights, KV
    /// and compute buffers. None if even `cpu-moe` does not fit.
    pub fn fit(&self, budget: u64, overhead: u64, ctx: u32) -> Option<MemoryPlan> {
        self.fit_for(budget, overhead, &KvLayout::full_size(ctx))
    }

    /// [`Self::fit`] for the KV layout `kv`.
    pub fn fit_for(&self, budget: u64, overhead: u64, kv: &KvLayout) -> Option<MemoryPlan> {
        (0..=self.n_layer)
            .map(|n| self.plan_for(n, kv))
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
            k_elements_per_token_layer: 128,
            v_elements_per_token_layer: 128,
            expert_bytes_per_layer: vec![100, 100, 100, 100],
            total_weight_bytes: 500,
            input_embedding_bytes: 0,
            tied_output: false,
            n_vocab: 0,
            n_embd: 0,
            n_swa: 0,
            swa_layers: 0,
        }
    }

    /// KV bytes of `shape()` for one stream of 256 cells (the smallest llama.cpp allocates).
    const KV: u64 = 256 * 4 * 256 * 2;

    #[test]
    fn plans_host_experts_for_the_first_layers() {
        let p = shape().plan(3, 256);
        assert_eq!(p.host_expert_bytes, 300);
        assert_eq!(p.device_weight_bytes, 200);
        assert_eq!(p.kv_bytes, KV);
        assert_eq!(
            shape().plan(3, 10).kv_bytes,
            KV,
            "llama.cpp pads n_ctx to 256"
        );
    }

    #[test]
    fn fit_picks_the_fewest_host_layers_that_fit() {
        let s = shape();
        // Weights 500 with 0 offloaded; no compute buffers (n_vocab 0).
        assert_eq!(s.fit(KV + 500, 0, 256).unwrap().n_cpu_moe, 0);
        assert_eq!(s.fit(KV + 350, 0, 256).unwrap().n_cpu_moe, 2);
        assert_eq!(s.fit(KV + 100, 0, 256).unwrap().n_cpu_moe, 4);
        assert!(s.fit(KV + 99, 0, 256).is_none());
    }

    #[test]
    fn input_embeddings_stay_on_the_host_with_a_device_copy_when_tied() {
        let mut s = shape();
        s.input_embedding_bytes = 40;
        let p = s.plan(0, 256);
        assert_eq!(p.host_input_bytes, 40);
        assert_eq!(p.device_weight_bytes, 460, "separate output projection");
        s.tied_output = true;
        assert_eq!(
            s.plan(0, 256).device_weight_bytes,
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
        assert_eq!(s.plan(0, 256).compute_bytes, compute);
        assert_eq!(s.fit(KV + 500 + compute, 0, 256).unwrap().n_cpu_moe, 0);
        assert_eq!(s.fit(KV + 499 + compute, 0, 256).unwrap().n_cpu_moe, 1);
        assert_eq!(s.fit(KV + 500 + compute + 7, 7, 256).unwrap().n_cpu_moe, 0);
    }

    /// gpt-oss-20b's attention: 24 layers, 12 of them sliding (window 128), 8 KV heads of 64.
    fn gpt_oss_20b() -> ModelShape {
        ModelShape {
            n_layer: 24,
            k_elements_per_token_layer: 8 * 64,
            v_elements_per_token_layer: 8 * 64,
            expert_bytes_per_layer: vec![0; 24],
            n_swa: 128,
            swa_layers: 12,
            ..shape()
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn sliding_window_layers_keep_a_window_and_a_micro_batch_per_sequence() {
        let s = gpt_oss_20b();
        // The worker's layout on the H200 run: 32768 cells, 16 sequences with a stream each.
        let kv = KvLayout {
            cells: 32768,
            sequences: 16,
            unified: false,
            ubatch: 512,
            swa_full: false,
            outputs_max: 0,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
        };
        // 2048 cells per stream for full layers; pad(128 + 512) = 768 for sliding ones.
        assert_eq!(kv.cells_per_stream(128), (16, 2048, 768));
        // 16 × (12 × 2048 + 12 × 768) cells × 1024 elements × 2 bytes: 1056 MiB, not 1536.
        // Against the H200 run of the synthetic gpt-oss-20b with this layout (nvidia-smi per
        // process): full 10949 MiB weights + 1056 KV + 528 compute + 640 overhead = 13173 MiB
        // planned vs 13120 measured (+0.4 %, was +4 % with full-size sliding layers); cpu-moe
        // 1242 + 1056 + 528 + 640 = 3466 vs 3312–3424 (+1.2 to +4.6 %, was +15 to +19 %).
        assert_eq!(s.kv_bytes_for(&kv), 1056 * MIB);
        assert_eq!(s.plan_for(0, &kv).kv_bytes, 1056 * MIB);
        let no_window = ModelShape {
            swa_layers: 0,
            ..gpt_oss_20b()
        };
        assert_eq!(no_window.kv_bytes_for(&kv), 1536 * MIB);
        let swa_full = KvLayout {
            swa_full: true,
            ..kv
        };
        assert_eq!(s.kv_bytes_for(&swa_full), 1536 * MIB, "llama.cpp's default");
        assert_eq!(s.kv_bytes(32768), 1536 * MIB, "plan() is the upper bound");
    }

    #[test]
    fn a_unified_cache_keeps_a_window_for_every_sequence() {
        // The benchmark's llama-server layout: 49152 cells shared by 64 sequences.
        let kv = KvLayout {
            cells: 49152,
            sequences: 64,
            unified: true,
            ubatch: 512,
            swa_full: false,
            outputs_max: 0,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
        };
        // 128 × 64 + 512 = 8704 cells (a multiple of 256) for the sliding layers.
        assert_eq!(kv.cells_per_stream(128), (1, 49152, 8704));
        assert_eq!(
            gpt_oss_20b().kv_bytes_for(&kv),
            (12 * 49152 + 12 * 8704) * 1024 * 2
        );
    }

    #[test]
    fn a_window_wider_than_the_context_is_the_context() {
        let kv = KvLayout {
            cells: 1000,
            sequences: 4,
            unified: false,
            ubatch: 512,
            swa_full: false,
            outputs_max: 0,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
        };
        // n_ctx 1024, 256 per stream; the window (128 + 512) is wider: 256.
        assert_eq!(kv.cells_per_stream(128), (4, 256, 256));
        let s = gpt_oss_20b();
        assert_eq!(s.kv_bytes_for(&kv), 4 * 24 * 256 * 1024 * 2);
        // An odd window is padded too: pad(100 + 7) = 256.
        let small = KvLayout {
            cells: 4096,
            sequences: 1,
            unified: true,
            ubatch: 7,
            swa_full: false,
            outputs_max: 0,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
        };
        assert_eq!(small.cells_per_stream(100), (1, 4096, 256));
    }

    #[test]
    fn a_smaller_micro_batch_shrinks_sliding_window_kv_and_compute_buffers() {
        let s = ModelShape {
            n_vocab: 201_088,
            n_embd: 2880,
            ..gpt_oss_20b()
        };
        // The cpu-moe benchmark setting: 16384 cells, 16 sequences with a stream each (1024 cells).
        let kv = |ubatch| KvLayout {
            cells: 16384,
            sequences: 16,
            unified: false,
            ubatch,
            swa_full: false,
            outputs_max: 0,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
        };
        // pad(128 + ubatch) cells per stream on the sliding layers.
        assert_eq!(kv(512).cells_per_stream(128), (16, 1024, 768));
        assert_eq!(kv(256).cells_per_stream(128), (16, 1024, 512));
        assert_eq!(kv(128).cells_per_stream(128), (16, 1024, 256));
        // 16 × 12 × (1024 + swa) cells × 1024 elements × 2 bytes.
        assert_eq!(s.kv_bytes_for(&kv(512)), 672 * MIB);
        assert_eq!(s.kv_bytes_for(&kv(256)), 576 * MIB);
        assert_eq!(s.kv_bytes_for(&kv(128)), 480 * MIB);
        // Compute buffers scale with the micro-batch.
        let c512 = s.plan_for(0, &kv(512)).compute_bytes;
        assert_eq!(c512, s.compute_bytes());
        assert_eq!(s.plan_for(0, &kv(256)).compute_bytes * 2, c512);
        assert_eq!(s.plan_for(0, &kv(128)).compute_bytes * 4, c512);
        // With one sampled row per stream (the worker's n_outputs_max), logits take 16 rows,
        // not 512: 4 × (16 × 201088 + 512 × 24 × 2880) bytes ≈ 147 MiB instead of 528.
        let worker = KvLayout {
            outputs_max: 16,
            ..kv(512)
        };
        assert_eq!(
            s.plan_for(0, &worker).compute_bytes,
            4 * (16 * 201_088 + 512 * 24 * 2880)
        );
        assert_eq!(s.compute_bytes(), 4 * 512 * (201_088 + 24 * 2880));
        // Upstream's unified layout at 16 sequences: 128 × 16 + ubatch, padded.
        let unified = |ubatch| KvLayout {
            unified: true,
            ..kv(ubatch)
        };
        assert_eq!(unified(512).cells_per_stream(128), (1, 16384, 2560));
        assert_eq!(unified(128).cells_per_stream(128), (1, 16384, 2304));
    }

    #[test]
    fn quantized_kv_cache_types_shrink_each_row_as_ggml_lays_them_out() {
        assert_eq!(KvCacheType::F16.row_bytes(512), 1024);
        assert_eq!(KvCacheType::F32.row_bytes(512), 2048);
        // 16 blocks of 32: 34 bytes each (f16 scale + 32 × i8), 18 for 4-bit (f16 + 16 bytes).
        assert_eq!(KvCacheType::Q8_0.row_bytes(512), 16 * 34);
        assert_eq!(KvCacheType::Q4_0.row_bytes(512), 16 * 18);
        assert_eq!(KvCacheType::Q5_1.row_bytes(512), 16 * 24);
        let s = gpt_oss_20b();
        let f16 = KvLayout {
            cells: 16384,
            sequences: 16,
            unified: false,
            ubatch: 512,
            swa_full: false,
            outputs_max: 16,
            type_k: KvCacheType::F16,
            type_v: KvCacheType::F16,
        };
        assert_eq!(s.kv_bytes_for(&f16), 672 * MIB);
        let q8 = KvLayout {
            type_k: KvCacheType::Q8_0,
            type_v: KvCacheType::Q8_0,
            ..f16
        };
        // 16 × 12 × (1024 + 768) cells × 2 rows × 544 bytes = 357 MiB, 34/64 of F16's.
        assert_eq!(s.kv_bytes_for(&q8), 16 * 12 * (1024 + 768) * 2 * 544);
        assert_eq!(s.kv_bytes_for(&q8) * 64, 672 * MIB * 34);
        // K and V are sized separately.
        let q8_k = KvLayout {
            type_k: KvCacheType::Q8_0,
            ..f16
        };
        assert_eq!(s.kv_bytes_for(&q8_k), 16 * 12 * (1024 + 768) * (544 + 1024));
    }

    #[test]
    fn kv_cache_type_names_are_llama_servers() {
        for t in KvCacheType::ALL {
            assert_eq!(t.as_str().parse::<KvCacheType>().unwrap(), t);
        }
        assert_eq!("Q8_0".parse::<KvCacheType>().unwrap(), KvCacheType::Q8_0);
        assert_eq!("iq4_nl".parse::<KvCacheType>().unwrap(), KvCacheType::Iq4Nl);
        let e = "q3_k".parse::<KvCacheType>().unwrap_err().to_string();
        assert!(e.contains("q3_k") && e.contains("q8_0"), "{e}");
        assert!(KvCacheType::Bf16.is_float() && !KvCacheType::Q4_1.is_float());
    }

    fn header(arch: &str, layers: u64, meta: &[(&str, u64)]) -> GgufHeader {
        use crate::gguf::Value;
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("general.architecture".into(), Value::Str(arch.into()));
        metadata.insert(format!("{arch}.block_count"), Value::U64(layers));
        for (k, v) in meta {
            metadata.insert(format!("{arch}.{k}"), Value::U64(*v));
        }
        GgufHeader {
            version: 3,
            metadata,
            tensors: vec![],
        }
    }

    #[test]
    fn the_sliding_layers_come_from_the_window_and_the_layer_pattern() {
        let window = [("attention.sliding_window", 128)];
        let s = ModelShape::from_gguf(&header("gpt-oss", 24, &window));
        assert_eq!((s.n_swa, s.swa_layers), (128, 12), "every other layer");
        let s = ModelShape::from_gguf(&header("gpt-oss", 2, &window));
        assert_eq!(s.swa_layers, 1, "the CI's 2-layer file: layer 0 slides");
        let three = [
            ("attention.sliding_window", 128),
            ("attention.sliding_window_pattern", 3),
        ];
        let s = ModelShape::from_gguf(&header("gpt-oss", 24, &three));
        assert_eq!(s.swa_layers, 16, "two of every three layers");
        let s = ModelShape::from_gguf(&header("gpt-oss", 24, &[]));
        assert_eq!(s.swa_layers, 0, "no window");
        let s = ModelShape::from_gguf(&header("llama", 24, &window));
        assert_eq!(s.swa_layers, 0, "not modelled: full size on every layer");
    }
}
