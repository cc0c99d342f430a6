// Host memory read bandwidth, the bound for decoding with experts in host RAM: every generated
// token reads the active experts' weights once. Sums a buffer much larger than the caches with
// all threads (OpenMP), best of several passes, in GB/s (1e9 bytes).
//   gcc -O3 -march=native -fopenmp bench/gpu/membw.c -o membw && ./membw [GiB] [passes]
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <omp.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? strtoul(argv[1], 0, 10) : 4;
    int passes = argc > 2 ? atoi(argv[2]) : 5;
    size_t n = gib * (1ull << 30) / sizeof(uint64_t);
    uint64_t *a = aligned_alloc(4096, n * sizeof(uint64_t));
    if (!a) { perror("alloc"); return 1; }
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = i;  // first touch by the thread that reads it later
    double best = 0;
    uint64_t sink = 0;
    for (int p = 0; p < passes; p++) {
        double t0 = now();
        uint64_t s = 0;
#pragma omp parallel for schedule(static) reduction(+ : s)
        for (size_t i = 0; i < n; i++) s += a[i];
        double gbs = n * sizeof(uint64_t) / (now() - t0) / 1e9;
        sink += s;
        if (gbs > best) best = gbs;
    }
    printf("read_gb_per_s=%.1f threads=%d bytes=%zu sink=%llu\n", best, omp_get_max_threads(),
           n * sizeof(uint64_t), (unsigned long long)(sink & 1));
    return 0;
}
