// Is ggml-cpu's MXFP4 x Q8_0 dot product (ggml_vec_dot_mxfp4_q8_0, arch/x86/quants.c; the kernel
// of gpt-oss's expert matmuls when the experts are in host memory) right, and how fast is it, in
// the ggml-cpu library this binary loads? Written for the AVX-512 version of that kernel
// (patches/llama.cpp/0003-*), which the build machine (AVX2 only) cannot run: the GPU host runs it
// against its native build and against the AVX2-only ggml-cpu (bench/gpu/run-on-device.sh's
// `kernel` stage), so the same check covers both code paths.
//
// Uses the public ggml API only: the CPU type traits' vec_dot for MXFP4 (vec_dot_type Q8_0),
// Q8_0's from_float for the activations, ggml_quantize_chunk for the MXFP4 weights (no imatrix),
// and each type's to_float for the reference.
//  1. Correctness: rows of n = 32*k, k in {1..13, 90, 180}, 5 seeds x 4 value patterns (per-block
//     magnitudes 2^-6..2^6 so the E8M0 exponents vary within a row; a row scaled by 1e-3; one by
//     1e3 with activation outliers; zero blocks and 2^-20..2^20 blocks), vec_dot(n, &s, 0, x, 0,
//     y, 0, 1) against the double-precision sum of the dequantized x_i*y_i. Passes when
//     |got - ref| <= 2e-5 * sum|x_i*y_i| + 1e-30 (the float accumulation of the per-block
//     integer sums); "rel err" below is |got - ref| / sum|x_i*y_i|. Each case runs twice, its
//     weight and activation rows placed (a) at the very end of a mapping followed by a PROT_NONE
//     guard page and (b) at its start, after one: a kernel that reads past either end of a row
//     (a wide load of the last blocks, say) dies with SIGSEGV. (a) also gives odd addresses for
//     odd k, as rows of 17-byte blocks have in real tensors.
//  2. Speed, one thread, n = 2880 (gpt-oss's hidden size: 90 blocks of 17 bytes, 1530 bytes a
//     row): (a) in cache, 1024 rows (1.5 MiB) against one activation row, repeated for >= 0.5 s:
//     ns per block and weight GB/s (1e9 bytes); (b) streaming, rows filling MXFP4_CHECK_MIB
//     (512) MiB, one pass over them, best of 3: weight GB/s, to read against bench/gpu/membw.c's
//     all-core figure (one core usually cannot reach it; the question is whether the kernel is).
// Prints a header line (the ggml-cpu features the loaded library reports, and the CPU's own
// AVX-512 flags from __builtin_cpu_supports: a library built without AVX-512 on an AVX-512 CPU
// shows both), the failing cases if any, then one result line:
//   mxfp4 vec_dot: PASS (max rel err 8.1e-08 over 300 cases); in cache 2.18 ns/block (7.8 GB/s); streaming 8.0 GB/s (512 MiB)
// (those figures: the AVX2 kernel on the 2-core AMD EPYC build VM).
// Exit status 1 when a case fails (the speed is still measured; a read into a guard page ends the
// run at once, with a FAIL result line naming the case), 2 on a setup error.
//
// Against the static libraries of the worker's llama-cpp-sys-2 build (AVX2 here):
//   OUT=$(ls -d ~/.cache/moe-cluster/target/debug/build/llama-cpp-sys-2-*/out | head -1)
//   gcc -O2 -std=c11 bench/mxfp4-kernel-check.c -I$OUT/include -o /tmp/mxfp4-check
//     $OUT/lib/libggml-cpu.a $OUT/lib/libggml-base.a -fopenmp -lstdc++ -lm -lpthread   (one line)
// Against shared libraries (the `kernel` stage: LIBS=build/bin of bench/gpu/build-llama-shared.sh,
// SRC its llama.cpp; LD_LIBRARY_PATH=$WORK/cpu-avx2 first swaps in the AVX2-only libggml-cpu.so):
//   gcc -O2 -std=c11 mxfp4-kernel-check.c -I$SRC/ggml/include -L$LIBS -lggml-cpu -lggml-base
//     -Wl,-rpath,$LIBS -Wl,--enable-new-dtags -lm -o mxfp4-kernel-check   (one line)
// env: MXFP4_CHECK_MIB (512): the streaming buffer; MXFP4_CHECK_SPEED=0 skips the speed part.
#define _GNU_SOURCE
#include "ggml.h"
#include "ggml-cpu.h"
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile float g_sink;   // every timed result goes here, so the calls cannot be dropped

// The case being run, written before each call: a read into a guard page ends the run with a
// result line that names it (write() only: async-signal-safe).
static char g_case[256];
static void on_segv(int sig) {
    (void)sig;
    static const char pre[] = "mxfp4 vec_dot: FAIL (SIGSEGV: read outside the row, ";
    ssize_t r = write(1, pre, sizeof pre - 1);
    r += write(1, g_case, strlen(g_case));
    r += write(1, ")\n", 2);
    (void)r;
    _exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// splitmix64: deterministic across machines and libcs (rand() is not)
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_unit(uint64_t *s) { return (float)((rng_next(s) >> 40) * (2.0 / 16777216.0) - 1.0); }   // [-1, 1)
static int rng_int(uint64_t *s, int lo, int hi) { return lo + (int)(rng_next(s) % (uint64_t)(hi - lo + 1)); }

// A mapping of `bytes` (rounded up to pages) between two PROT_NONE pages: reading one byte before
// data or one byte after data + size faults.
typedef struct { uint8_t *map, *data; size_t map_len, size; } guarded;
static int guarded_alloc(guarded *g, size_t bytes) {
    size_t ps = (size_t)sysconf(_SC_PAGESIZE);
    g->size = (bytes + ps - 1) / ps * ps;
    g->map_len = g->size + 2 * ps;
    g->map = mmap(NULL, g->map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g->map == MAP_FAILED) { perror("mmap"); return -1; }
    if (mprotect(g->map, ps, PROT_NONE) || mprotect(g->map + ps + g->size, ps, PROT_NONE)) { perror("mprotect"); return -1; }
    g->data = g->map + ps;
    return 0;
}

// Fills x (weights, n values) and y (activations) for value pattern `pat`.
static void make_case(uint64_t *rs, int pat, int n, float *x, float *y) {
    for (int b = 0; b < n / 32; b++) {
        // per-block magnitude: E8M0 exponents that differ between the blocks of one row
        float fx = ldexpf(1.0f, rng_int(rs, -6, 6));
        if (pat == 3) fx = rng_int(rs, 0, 4) == 0 ? 0.0f : ldexpf(1.0f, rng_int(rs, -20, 20));
        float fy = ldexpf(1.0f, rng_int(rs, -3, 3));
        for (int j = 0; j < 32; j++) {
            x[b * 32 + j] = fx * rng_unit(rs);
            y[b * 32 + j] = fy * rng_unit(rs);
        }
    }
    for (int i = 0; i < n; i++) {
        if (pat == 1) x[i] *= 1e-3f;
        if (pat == 2) { x[i] *= 1e3f; if (rng_int(rs, 0, 15) == 0) y[i] *= 50.0f; }
        if (pat == 3 && i % 7 == 0) y[i] *= 1e-2f;
    }
}

int main(void) {
    ggml_cpu_init();
    const struct ggml_type_traits_cpu *tc = ggml_get_type_traits_cpu(GGML_TYPE_MXFP4);
    const struct ggml_type_traits_cpu *tq8 = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0);
    const struct ggml_type_traits *tw = ggml_get_type_traits(GGML_TYPE_MXFP4);
    const struct ggml_type_traits *ta = ggml_get_type_traits(GGML_TYPE_Q8_0);
    __builtin_cpu_init();
    printf("# mxfp4-kernel-check: ggml-cpu avx2=%d avx512=%d avx512_vbmi=%d avx512_vnni=%d avx512_bf16=%d amx_int8=%d;"
           " cpu avx512f=%d avx512bw=%d avx512vnni=%d avx512vbmi=%d\n",
           ggml_cpu_has_avx2(), ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vbmi(), ggml_cpu_has_avx512_vnni(),
           ggml_cpu_has_avx512_bf16(), ggml_cpu_has_amx_int8(), !!__builtin_cpu_supports("avx512f"),
           !!__builtin_cpu_supports("avx512bw"), !!__builtin_cpu_supports("avx512vnni"),
           !!__builtin_cpu_supports("avx512vbmi"));
    if (!tc->vec_dot || tc->vec_dot_type != GGML_TYPE_Q8_0 || !tq8->from_float || !tw->to_float || !ta->to_float) {
        printf("mxfp4 vec_dot: ERROR (type traits: vec_dot %s, vec_dot_type %s, Q8_0 from_float %s)\n",
               tc->vec_dot ? "set" : "null", ggml_type_name(tc->vec_dot_type), tq8->from_float ? "set" : "null");
        return 2;
    }
    if (ggml_quantize_requires_imatrix(GGML_TYPE_MXFP4)) {   // not in ggml 0.26.0; the check below passes NULL
        printf("mxfp4 vec_dot: ERROR (ggml_quantize_requires_imatrix(MXFP4) is true)\n");
        return 2;
    }
    fflush(stdout);
    signal(SIGSEGV, on_segv);
    signal(SIGBUS, on_segv);

    // ---- 1. correctness
    static const int ks[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 90, 180};
    const int nks = (int)(sizeof ks / sizeof ks[0]), nmax = 32 * 180, nseeds = 5, npat = 4;
    float *x = malloc(nmax * sizeof(float)), *y = malloc(nmax * sizeof(float));
    float *xd = malloc(nmax * sizeof(float)), *yd = malloc(nmax * sizeof(float));
    uint8_t *wq = malloc(ggml_row_size(GGML_TYPE_MXFP4, nmax)), *aq = malloc(ggml_row_size(GGML_TYPE_Q8_0, nmax));
    guarded gw, ga;
    if (!x || !y || !xd || !yd || !wq || !aq || guarded_alloc(&gw, ggml_row_size(GGML_TYPE_MXFP4, nmax)) ||
        guarded_alloc(&ga, ggml_row_size(GGML_TYPE_Q8_0, nmax))) {
        printf("mxfp4 vec_dot: ERROR (allocation)\n");
        return 2;
    }
    int cases = 0, failed = 0;
    double max_rel = 0;
    for (int seed = 1; seed <= nseeds; seed++) {
        for (int ki = 0; ki < nks; ki++) {
            for (int pat = 0; pat < npat; pat++) {
                const int n = 32 * ks[ki];
                const size_t wb = ggml_row_size(GGML_TYPE_MXFP4, n), ab = ggml_row_size(GGML_TYPE_Q8_0, n);
                uint64_t rs = (uint64_t)seed * 1000003u + (uint64_t)ks[ki] * 101u + (uint64_t)pat;
                make_case(&rs, pat, n, x, y);
                ggml_quantize_chunk(GGML_TYPE_MXFP4, x, wq, 0, 1, n, NULL);
                tq8->from_float(y, aq, n);
                tw->to_float(wq, xd, n);
                ta->to_float(aq, yd, n);
                double ref = 0, mag = 0;
                for (int i = 0; i < n; i++) {
                    ref += (double)xd[i] * (double)yd[i];
                    mag += fabs((double)xd[i] * (double)yd[i]);
                }
                const double tol = 2e-5 * mag + 1e-30;
                for (int place = 0; place < 2; place++) {
                    // place 0: both rows end where the guard page begins; 1: both start right after one
                    uint8_t *pw = place == 0 ? gw.data + gw.size - wb : gw.data;
                    uint8_t *pa = place == 0 ? ga.data + ga.size - ab : ga.data;
                    memcpy(pw, wq, wb);
                    memcpy(pa, aq, ab);
                    float s = NAN;
                    snprintf(g_case, sizeof g_case, "seed %d n %d (k %d) pattern %d rows at %s", seed, n, ks[ki], pat,
                             place == 0 ? "end (guard after)" : "start (guard before)");
                    tc->vec_dot(n, &s, 0, pw, 0, pa, 0, 1);
                    const double err = fabs((double)s - ref), rel = mag > 0 ? err / mag : err;
                    if (!isnan(max_rel) && (isnan(rel) || rel > max_rel)) max_rel = rel;   // a NaN result sticks
                    if (!(err <= tol)) {
                        if (failed < 20)
                            printf("FAIL %s: got %.9g ref %.9g |diff| %.3g tol %.3g\n",
                                   g_case, (double)s, ref, err, tol);
                        fflush(stdout);   // before a later SIGSEGV's _exit
                        failed++;
                    }
                }
                cases++;
            }
        }
    }
    char result[160];
    if (failed)
        snprintf(result, sizeof result, "FAIL (%d of %d runs over tolerance, max rel err %.2g over %d cases)",
                 failed, 2 * cases, max_rel, cases);
    else
        snprintf(result, sizeof result, "PASS (max rel err %.2g over %d cases)", max_rel, cases);
    signal(SIGSEGV, SIG_DFL);
    signal(SIGBUS, SIG_DFL);
    fflush(stdout);

    // ---- 2. speed, one thread
    const char *sp = getenv("MXFP4_CHECK_SPEED");
    if (sp && strcmp(sp, "0") == 0) {
        printf("mxfp4 vec_dot: %s; speed not measured (MXFP4_CHECK_SPEED=0)\n", result);
        return failed ? 1 : 0;
    }
    const int n = 2880, rows = 1024, nb = n / 32;
    const size_t rb = ggml_row_size(GGML_TYPE_MXFP4, n);
    float *wf = malloc((size_t)rows * n * sizeof(float));
    uint8_t *W = aligned_alloc(64, (rows * rb + 63) / 64 * 64), *A = aligned_alloc(64, 4096);
    if (!wf || !W || !A) { printf("mxfp4 vec_dot: %s; ERROR (allocation for the speed runs)\n", result); return 2; }
    uint64_t rs = 42;
    for (size_t i = 0; i < (size_t)rows * n; i++) wf[i] = ldexpf(rng_unit(&rs), rng_int(&rs, -4, 4));
    for (int i = 0; i < n; i++) x[i] = rng_unit(&rs);
    ggml_quantize_chunk(GGML_TYPE_MXFP4, wf, W, 0, rows, n, NULL);
    tq8->from_float(x, A, n);
    free(wf);
    float acc = 0, s = 0;
    for (int r = 0; r < rows; r++) { tc->vec_dot(n, &s, 0, W + r * rb, 0, A, 0, 1); acc += s; }   // warm-up
    long reps = 0;
    double t0 = now(), dt;
    do {
        for (int r = 0; r < rows; r++) { tc->vec_dot(n, &s, 0, W + r * rb, 0, A, 0, 1); acc += s; }
        reps++;
        dt = now() - t0;
    } while (dt < 0.5);
    g_sink = acc;
    const double ns_block = dt * 1e9 / ((double)reps * rows * nb), cache_gbs = (double)reps * rows * rb / dt / 1e9;

    // (b) streaming: the 1024 quantized rows copied round to fill the buffer (written once, first touch)
    const char *mibs = getenv("MXFP4_CHECK_MIB");
    const size_t mib = mibs && atol(mibs) > 0 ? (size_t)atol(mibs) : 512;
    const size_t srows = (mib << 20) / rb;
    uint8_t *S = malloc(srows * rb);
    if (!S) { printf("mxfp4 vec_dot: %s; in cache %.2f ns/block (%.1f GB/s); streaming: no %zu MiB\n", result, ns_block, cache_gbs, mib); return failed ? 1 : 2; }
    for (size_t r = 0; r < srows; r++) memcpy(S + r * rb, W + (r % rows) * rb, rb);
    double best = 0;
    for (int pass = 0; pass < 3; pass++) {
        acc = 0;
        t0 = now();
        for (size_t r = 0; r < srows; r++) { tc->vec_dot(n, &s, 0, S + r * rb, 0, A, 0, 1); acc += s; }
        dt = now() - t0;
        g_sink = acc;
        if (srows * rb / dt / 1e9 > best) best = srows * rb / dt / 1e9;
    }
    printf("mxfp4 vec_dot: %s; in cache %.2f ns/block (%.1f GB/s); streaming %.1f GB/s (%zu MiB)\n",
           result, ns_block, cache_gbs, best, mib);
    return failed ? 1 : 0;
}
