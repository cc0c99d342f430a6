// Which ggml-cpu op makes a sequence's decode depend on how many rows share the llama.cpp call?
// (docs/benchmarks/batch-invariance.md, "CPU-only batched/grouped decode".)
//
// Runs the same greedy sequence twice on one model: with NA identical sequences per decode call,
// then with NB; each sequence has its own KV stream (kv_unified off, 8 streams of 512 cells, as
// `moe-worker --parallel 8 --ctx-size 4096`), prompts are prefilled one sequence per call (same
// shapes in both runs). It prints how many greedy tokens of sequence 0 agree, then compares
// every F32 tensor of the last decode call (llama.cpp's eval callback) for sequence 0's row and
// prints the first ones that differ: the first is the op that depends on the call's row count.
// Unnamed nodes (node_N) are matched by name and order and may pair different ops.
//
// Build against the static libraries of the llama-cpp-sys-2 build the worker links:
//   OUT=$(ls -d $CARGO_TARGET_DIR/debug/build/llama-cpp-sys-2-*/out | head -1)
//   SRC=$(ls -d ~/.cargo/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp)
//   L="$OUT/build/src/libllama.a $OUT/build/ggml/src/libggml.a $OUT/build/ggml/src/libggml-cpu.a"
//   g++ -O1 -std=c++17 bench/cpu-invariance-probe.cpp -I$SRC/include -I$SRC/ggml/include
//     -o /tmp/probe $L $OUT/build/ggml/src/libggml-base.a -fopenmp -lpthread -ldl   (one line)
// Against shared libraries (bench/gpu/run-on-device.sh's `probe` stage, CUDA build on the device:
// LIBS=build/bin of bench/gpu/build-llama-shared.sh, SRC its llama.cpp; ggml links its backends):
//   g++ -O1 -std=c++17 cpu-invariance-probe.cpp -I$SRC/include -I$SRC/ggml/include -L$LIBS -lllama
//     -lggml -lggml-base -Wl,-rpath,$LIBS -Wl,--enable-new-dtags -fopenmp -o probe   (one line)
// To try a changed ggml-cpu source file, compile it with the flags of
// $OUT/build/ggml/src/CMakeFiles/ggml-cpu.dir/flags.make and put its object before the archives.
// For patch 0002 (PROBE_BI below), compile all of ggml-cpu's files from a copy of $SRC patched with
// scripts/patch-llama.sh (0002 changes ggml-cpu-impl.h) into an archive used instead of libggml-cpu.a.
//
// usage: probe MODEL.gguf REPACK(0|1: use_extra_bufts) NA NB [STEPS=1] [PROMPT_REPEATS=1]
//   e.g. probe gptoss-2l.gguf 1 1 8 64     (a lone sequence vs 8 together, 64 decode steps)
//        probe MODEL REPACK time ROWS,ROWS,... [STEPS=16] [PROMPT_REPEATS=1]
//   timing mode: for each row count, the prompt prefilled one sequence per call, then STEPS
//   decode calls of that many rows (no eval callback); prints ms per prefill call and per decode
//   call (median of the calls after the first).
// env: PROBE_LOG=1 shows llama.cpp's log (buffer types, "repack tensor ..." lines).
//      PROBE_BI=0|1: with patch 0002 (patches/llama.cpp), switch ggml-cpu's batch-invariant mode
//      through the CPU registry's proc "ggml_backend_cpu_set_batch_invariant", as the worker
//      would: on (PROBE_BI=1) for the decode calls, off for the prefill calls; unset: not touched
//      (GGML_CPU_BATCH_INVARIANT=1 in the environment then decides, for every call).
//      PROBE_THREADS=N: n_threads and n_threads_batch (default 2).
//      PROBE_NGL=N: model param n_gpu_layers = N (unset: llama.cpp's default, -1 = all layers on
//      the GPU when one is present; a CPU-only build or CUDA_VISIBLE_DEVICES= has none).
//      PROBE_CPU_MOE=1: routed experts in host memory like llama.cpp's --cpu-moe (tensor buffer
//      override "\.ffn_(up|down|gate|gate_up)_(ch|)exps" -> CPU buffer type, and load_mode NONE,
//      i.e. no mmap, as `-lm none` / the worker's host experts).
//      PROBE_CUDA_BI=R: with patch 0001, switch the CUDA backend's batch-invariant mode through the
//      CUDA registry's proc "ggml_backend_cuda_set_batch_invariant" like PROBE_BI: R (rows) for
//      the decode calls, 0 for the prefill calls; exits 1 when there is no such proc (no CUDA
//      backend, e.g. the CPU static build, or the patch missing).
//      PROBE_BI_PREFILL=1: the switches (PROBE_BI, PROBE_CUDA_BI) stay on for the prefill calls
//      too (what a prompt costs with the batch-invariant kernels; timing mode)
//      PROBE_NO_OFFLOAD=1: context param op_offload = false (ops on host-resident weights stay on
//      the CPU for every batch size).
//      PROBE_CB_LAST=1: the eval callback asks for nodes only in the recorded (last) decode call, so
//      every other call runs whole graph splits (kernel fusion as in the worker); default: every
//      call runs node by node (each node its own graph: no fusion across nodes, CPU or CUDA).
//      The result line names these settings and the CPU backend's features (e.g. AVX512=1), which
//      shows which libggml-cpu was loaded.
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <string>
#include <vector>
#include <cmath>
#include <chrono>

struct Rec { std::string name; std::string op; std::vector<float> data; int64_t ne[4]; };
static std::vector<Rec> * g_recs = nullptr;

// patch 0002's switch (null when PROBE_BI is unset or the library lacks the patch)
typedef void (*set_bi_t)(int);
static set_bi_t g_set_bi = nullptr;
static int g_bi = 0;
// patch 0001's switch (null when PROBE_CUDA_BI is unset)
static set_bi_t g_set_cuda_bi = nullptr;
static int g_cuda_bi = 0;
static void set_bi(bool decode) {
    if (g_set_bi) g_set_bi(decode ? g_bi : 0);
    if (g_set_cuda_bi) g_set_cuda_bi(decode ? g_cuda_bi : 0);
}
static bool g_bi_prefill = false;   // PROBE_BI_PREFILL=1: the switches stay on for prefill calls too
static int g_threads = 2;
static bool g_no_offload = false;
static bool g_cb_last = false;
static std::string g_settings;   // the env knobs, for the result lines
static bool g_timing = false;
static std::vector<double> g_prefill_ms, g_decode_ms;
static double now_ms() { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static bool cb(struct ggml_tensor * t, bool ask, void *) {
    if (ask) return !g_cb_last || g_recs != nullptr;
    if (!g_recs || t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) return true;
    Rec r; r.name = t->name; r.op = ggml_op_desc(t);
    for (int i = 0; i < 4; i++) r.ne[i] = t->ne[i];
    r.data.resize(ggml_nelements(t));
    ggml_backend_tensor_get(t, r.data.data(), 0, ggml_nbytes(t));
    g_recs->push_back(std::move(r));
    return true;
}

static std::vector<Rec> run(llama_model * model, int nseq, const std::vector<llama_token> & prompt, int steps, std::vector<llama_token> & out_tokens) {
    auto cp = llama_context_default_params();
    const int nmax = std::max(8, nseq);
    cp.n_ctx = 512 * nmax; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_seq_max = nmax; cp.kv_unified = false;
    cp.n_threads = g_threads; cp.n_threads_batch = g_threads; cp.op_offload = !g_no_offload; cp.cb_eval = g_timing ? nullptr : cb; cp.cb_eval_user_data = nullptr;
    cp.n_outputs_max = nmax;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); exit(1); }
    const int n = prompt.size();
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    auto argmax = [&](int i) { const float * l = llama_get_logits_ith(ctx, i); int best = 0; for (int v = 1; v < n_vocab; v++) if (l[v] > l[best]) best = v; return best; };
    llama_token first_tok = 0;
    // prefill: one call per sequence (same shapes in both runs)
    llama_batch b = llama_batch_init(std::max(n, nmax), 0, 1);
    for (int s = 0; s < nseq; s++) {
        b.n_tokens = 0;
        for (int i = 0; i < n; i++) {
            int k = b.n_tokens++;
            b.token[k] = prompt[i]; b.pos[k] = i; b.n_seq_id[k] = 1; b.seq_id[k][0] = s; b.logits[k] = (i == n - 1);
        }
        set_bi(g_bi_prefill);
        double t0 = now_ms();
        if (llama_decode(ctx, b)) { fprintf(stderr, "prefill failed\n"); exit(1); }
        g_prefill_ms.push_back(now_ms() - t0);
        if (s == 0) first_tok = argmax(n - 1);
    }
    llama_token tok = first_tok;
    out_tokens.push_back(tok);
    std::vector<Rec> recs;
    for (int st = 0; st < steps; st++) {
        b.n_tokens = 0;
        for (int s = 0; s < nseq; s++) { int k = b.n_tokens++; b.token[k] = tok; b.pos[k] = n + st; b.n_seq_id[k] = 1; b.seq_id[k][0] = s; b.logits[k] = 1; }
        if (st == steps - 1 && !g_timing) g_recs = &recs;
        set_bi(true);
        double t0 = now_ms();
        if (llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); exit(1); }
        g_decode_ms.push_back(now_ms() - t0);
        g_recs = nullptr;
        tok = argmax(0);
        out_tokens.push_back(tok);
    }
    llama_batch_free(b);
    llama_free(ctx);
    return recs;
}

int main(int argc, char ** argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s MODEL REPACK NA NB [STEPS] [PROMPT_REPEATS]\n       %s MODEL REPACK time ROWS,... [STEPS] [PROMPT_REPEATS]\n", argv[0], argv[0]); return 2; }
    const char * path = argv[1];
    int repack = atoi(argv[2]);
    g_timing = strcmp(argv[3], "time") == 0;
    int na = g_timing ? 0 : atoi(argv[3]);
    int nseq = g_timing ? 0 : atoi(argv[4]);
    int steps = argc > 5 ? atoi(argv[5]) : (g_timing ? 16 : 1);
    int rep = argc > 6 ? atoi(argv[6]) : 1;
    if (!getenv("PROBE_LOG")) llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    if (const char * bi = getenv("PROBE_BI")) {
        g_bi = atoi(bi);
        ggml_backend_reg_t reg = ggml_backend_reg_by_name("CPU");
        g_set_bi = reg ? (set_bi_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cpu_set_batch_invariant") : nullptr;
        if (!g_set_bi) { fprintf(stderr, "PROBE_BI set but the CPU backend has no ggml_backend_cpu_set_batch_invariant (patch 0002 not applied)\n"); return 1; }
    }
    if (const char * bi = getenv("PROBE_CUDA_BI")) {
        g_cuda_bi = atoi(bi);
        ggml_backend_reg_t reg = ggml_backend_reg_by_name("CUDA");
        g_set_cuda_bi = reg ? (set_bi_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_cuda_set_batch_invariant") : nullptr;
        if (!g_set_cuda_bi) {
            fprintf(stderr, "PROBE_CUDA_BI set but %s\n", reg ? "the CUDA backend has no ggml_backend_cuda_set_batch_invariant (patch 0001 not applied)"
                                                              : "there is no CUDA backend (a CPU-only build)");
            return 1;
        }
    }
    if (const char * t = getenv("PROBE_THREADS")) g_threads = std::max(1, atoi(t));
    g_no_offload = getenv("PROBE_NO_OFFLOAD") && atoi(getenv("PROBE_NO_OFFLOAD")) != 0;
    g_cb_last = getenv("PROBE_CB_LAST") && atoi(getenv("PROBE_CB_LAST")) != 0;
    g_bi_prefill = getenv("PROBE_BI_PREFILL") && atoi(getenv("PROBE_BI_PREFILL")) != 0;
    const bool cpu_moe = getenv("PROBE_CPU_MOE") && atoi(getenv("PROBE_CPU_MOE")) != 0;
    auto mp = llama_model_default_params();
    mp.use_extra_bufts = repack != 0;
    if (const char * ngl = getenv("PROBE_NGL")) mp.n_gpu_layers = atoi(ngl);
    static llama_model_tensor_buft_override cpu_moe_overrides[2] = {
        { "\\.ffn_(up|down|gate|gate_up)_(ch|)exps", nullptr }, { nullptr, nullptr } };
    if (cpu_moe) {
        cpu_moe_overrides[0].buft = ggml_backend_cpu_buffer_type();
        mp.tensor_buft_overrides = cpu_moe_overrides;
        mp.load_mode = LLAMA_LOAD_MODE_NONE;   // no mmap (the header's use_mmap = false)
    }
    {
        auto env = [](const char * k) { const char * v = getenv(k); return std::string(v ? v : "unset"); };
        std::string feats;
        if (ggml_backend_reg_t cpu = ggml_backend_reg_by_name("CPU")) {
            auto get = (ggml_backend_get_features_t) ggml_backend_reg_get_proc_address(cpu, "ggml_backend_get_features");
            for (ggml_backend_feature * f = get ? get(cpu) : nullptr; f && f->name; f++) {
                if (strcmp(f->value, "1") == 0 && (strncmp(f->name, "AVX", 3) == 0 || strncmp(f->name, "AMX", 3) == 0)) {
                    feats += feats.empty() ? "" : ","; feats += f->name;
                }
            }
        }
        std::string devs;
        for (size_t i = 0; i < ggml_backend_dev_count(); i++) {
            ggml_backend_dev_t d = ggml_backend_dev_get(i);
            if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_CPU) continue;
            devs += devs.empty() ? "" : ","; devs += ggml_backend_dev_name(d);
        }
        g_settings = "threads=" + std::to_string(g_threads) + " PROBE_NGL=" + env("PROBE_NGL") + " cpu_moe=" + (cpu_moe ? "1" : "0") +
            " PROBE_CUDA_BI=" + env("PROBE_CUDA_BI") + " op_offload=" + (g_no_offload ? "0" : "1") + " cb=" + (g_cb_last ? "last" : "all") +
            " cpu_features=" + (feats.empty() ? "none" : feats) + " gpus=" + (devs.empty() ? "none" : devs);
    }
    llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", path); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::string text = "Once upon a time, in a small village by the sea,";
    { std::string t; for (int i = 0; i < rep; i++) t += text; text = t; }
    std::vector<llama_token> prompt(4096);
    int np = llama_tokenize(vocab, text.c_str(), text.size(), prompt.data(), prompt.size(), false, true);
    prompt.resize(np);
    if (g_timing) {
        auto median = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v.empty() ? 0.0 : v[v.size() / 2]; };
        printf("repack=%d PROBE_BI=%s %s prompt %d tokens, %d decode steps\n", repack, getenv("PROBE_BI") ? getenv("PROBE_BI") : "unset", g_settings.c_str(), np, steps);
        for (const char * p = argv[4]; *p; ) {
            int rows = atoi(p);
            g_prefill_ms.clear(); g_decode_ms.clear();
            std::vector<llama_token> t;
            run(model, rows, prompt, steps, t);
            std::vector<double> d(g_decode_ms.begin() + 1, g_decode_ms.end());
            printf("  rows %2d: prefill %.1f ms/call (median of %zu), decode %.2f ms/call (median of %zu)\n", rows, median(g_prefill_ms), g_prefill_ms.size(), median(d), d.size());
            fflush(stdout);
            while (*p && *p != ',') p++;
            if (*p == ',') p++;
        }
        llama_model_free(model);
        return 0;
    }
    std::vector<llama_token> t1, tn;
    auto a = run(model, na, prompt, steps, t1);
    auto bb = run(model, nseq, prompt, steps, tn);
    int same_tok = 0; for (size_t i = 0; i < t1.size(); i++) same_tok += t1[i] == tn[i];
    printf("repack=%d PROBE_BI=%s %s rows %d vs %d, prompt %d tokens, steps=%d: greedy tokens equal %d/%zu\n", repack, getenv("PROBE_BI") ? getenv("PROBE_BI") : "unset", g_settings.c_str(), na, nseq, np, steps, same_tok, t1.size());
    size_t j = 0; int shown = 0; size_t compared = 0, skipped = 0;
    for (size_t i = 0; i < a.size(); i++) {
        const Rec & x = a[i];
        size_t k2 = j; while (k2 < bb.size() && bb[k2].name != x.name) k2++;
        if (k2 == bb.size()) { skipped++; continue; }
        j = k2 + 1;
        const Rec & y = bb[k2];
        size_t S = x.data.size();
        if (y.data.size() < S) { skipped++; continue; }
        compared++;
        double md = 0; size_t nd = 0;
        for (size_t k = 0; k < S; k++) { double d = fabs((double)x.data[k] - y.data[k]); if (x.data[k] != y.data[k]) nd++; if (d > md) md = d; }
        if (nd && shown < 6) {
            printf("  DIFF %-28s %-14s ne=[%lld,%lld,%lld,%lld] vs [%lld,%lld,%lld,%lld] differing=%zu/%zu maxabs=%g\n", x.name.c_str(), x.op.c_str(),
                (long long)x.ne[0],(long long)x.ne[1],(long long)x.ne[2],(long long)x.ne[3],(long long)y.ne[0],(long long)y.ne[1],(long long)y.ne[2],(long long)y.ne[3], nd, S, md);
            shown++;
        }
    }
    printf("  compared %zu tensors (row 0), %zu not matched\n", compared, skipped);
    if (!shown) printf("  all compared tensors equal\n");
    llama_model_free(model);
    return 0;
}
