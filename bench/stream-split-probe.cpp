// bench/stream-split-probe.cpp: how many graphs llama.cpp computes for one decode call of
// several sequences with per-sequence KV streams (kv_unified = false), by the sequences' ids.
// llama.cpp's batch splitter (llama_batch_allocr::split_equal with sequential = true) puts only
// consecutive sequence ids into one micro-batch, because the KV views of a micro-batch span a
// contiguous range of streams: a call for sequences 0, 2, 4, 6 runs four graphs, each reading the
// model's weights again. This is why moe-worker keeps its running sequences' streams
// consecutive (crates/worker/src/engine/batcher.rs, `compact_streams`).
//
// Counts graphs with an eval callback on the last node (`result_output`) and times the calls.
// CPU only; any GGUF (e.g. models/smollm2-moe-4x2.gguf, built by scripts/test.sh).
//   L=$(ls -dt ~/.cache/moe-cluster/target/debug/build/llama-cpp-sys-2-*/out | head -1)
//   R=$(ls -d ~/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp)
//   g++ -O2 -std=c++17 bench/stream-split-probe.cpp -I$R/include -I$R/ggml/include -L$L/lib \
//       -lllama -lggml -lggml-cpu -lggml-base -fopenmp -lpthread -lm -o /tmp/stream-split-probe
//   /tmp/stream-split-probe models/smollm2-moe-4x2.gguf [CALLS]
// Output (2-core AVX2 VM, 2026-12-02): 1.00 graphs a call for sequences 0,1,2,3; 4.00 for
// 0,2,4,6; 2.00 for 0,1,4,5.
#include "llama.h"
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
#include "ggml.h"
static int g_graphs = 0;
static bool cb(struct ggml_tensor * t, bool ask, void *) { if (strcmp(t->name, "result_output") != 0) return false; if (!ask) ++g_graphs; return true; }
static double run(llama_context * ctx, const std::vector<int> & seqs, std::vector<int> & pos, int calls) {
    llama_batch b = llama_batch_init(8, 0, 1);
    auto t0 = std::chrono::steady_clock::now();
    for (int c = 0; c < calls; ++c) {
        b.n_tokens = 0;
        for (int s : seqs) {
            int i = b.n_tokens++;
            b.token[i] = 100 + (c % 50); b.pos[i] = pos[s]++; b.n_seq_id[i] = 1; b.seq_id[i][0] = s; b.logits[i] = 1;
        }
        if (llama_decode(ctx, b) != 0) { fprintf(stderr, "decode failed\n"); exit(1); }
    }
    auto t1 = std::chrono::steady_clock::now();
    llama_batch_free(b);
    return std::chrono::duration<double, std::milli>(t1 - t0).count() / calls;
}
int main(int argc, char ** argv) {
    llama_backend_init();
    auto mp = llama_model_default_params(); mp.n_gpu_layers = 0;
    llama_model * m = llama_model_load_from_file(argv[1], mp);
    auto cp = llama_context_default_params();
    cp.n_ctx = 8 * 512; cp.n_seq_max = 8; cp.kv_unified = false; cp.n_batch = 512; cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = 2; cp.no_perf = false; cp.cb_eval = cb; cp.cb_eval_user_data = nullptr;
    llama_context * ctx = llama_init_from_model(m, cp);
    std::vector<int> pos(8, 0);
    llama_batch b = llama_batch_init(64, 0, 1);
    for (int s = 0; s < 8; ++s) {
        b.n_tokens = 16;
        for (int i = 0; i < 16; ++i) { b.token[i] = 10 + i; b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = s; b.logits[i] = i == 15; }
        if (llama_decode(ctx, b) != 0) return 1;
        pos[s] = 16;
    }
    int calls = argc > 2 ? atoi(argv[2]) : 20;
    for (int r = 0; r < 3; ++r) {
        g_graphs = 0; double a = run(ctx, {0, 1, 2, 3}, pos, calls); int ga = g_graphs;
        g_graphs = 0; double g = run(ctx, {0, 2, 4, 6}, pos, calls); int gg = g_graphs;
        g_graphs = 0; double h = run(ctx, {0, 1, 4, 5}, pos, calls); int gh = g_graphs;
        g_graphs = 0; double one = run(ctx, {7}, pos, calls); int g1 = g_graphs;
        printf("round %d: per call: seqs 0,1,2,3 %.1f ms %.2f graphs | 0,2,4,6 %.1f ms %.2f graphs | 0,1,4,5 %.1f ms %.2f graphs | one seq %.1f ms %.2f graphs\n",
               r, a, (double) ga / calls, g, (double) gg / calls, h, (double) gh / calls, one, (double) g1 / calls);
    }
    return 0;
}
