#!/usr/bin/env bash
# Side-by-side GPU benchmark of moe-worker (CUDA) and upstream llama-server on the lent device
# machine, synthetic gpt-oss-20b: VRAM peaks at equal settings and micro-batch sizes, speed per
# offload profile, host-expert decode against the measured host read bandwidth (AVX-512 vs AVX2 CPU
# code, thread counts), INTERACTIVE TTFT under 64 BATCH streams, the chat-turn prefix-routing
# benchmark (bench/prefix-routing.sh), the product on two GPUs, N-on-N admission and the gateway's
# overhead, and the batch-invariance check (bench/gpu/invariance.sh). Issues 14, 16, 17 and 18;
# results in docs/benchmarks/gpu.md.
#
# The device has no Rust toolchain and no network. The carry folder (bench/gpu/prepare-carry.sh)
# holds a worker built here against *shared* llama.cpp libraries (`LLAMA_BUILD_SHARED_LIBS=1`) and
# that llama.cpp source, which the device compiles with CUDA and its native CPU flags
# (bench/gpu/build-llama-shared.sh, ~4 min on 8 cores), and upstream's source (the llama-cpp-python
# sdist's vendored llama.cpp), built there with the same CPU flags on the other 8 cores at the same
# time. The whole job outlasts one device command (10 min): `start` launches it detached and
# `wait` follows it; device calls made back to back (the machine stays warm ~30 s) keep it alive.
#
#   bench/gpu/run-on-device.sh start CARRY_DIR     launch the pipeline, return at once
#   bench/gpu/run-on-device.sh wait SECONDS        follow it until it ends or SECONDS pass; results to $OUT
#   bench/gpu/run-on-device.sh dry-run CARRY_DIR   the pipeline in the foreground on a machine without
#                                                  a GPU (a stub nvidia-smi; see DRY RUN below)
#   bench/gpu/run-on-device.sh pipeline            (internal)
# Stages run in STAGES order, except that while upstream llama-server still builds, the first
# stage that does not need it runs (ours-only: invariance gateway interactive64 prefix two-gpu probe
# kernel);
# every stage is skipped when the budget no longer fits it (results/skipped.txt).
#   vram          cpu-moe 16384 cells / 16 seqs, ours vs upstream at each micro-batch of VRAM_UBS
#                 (--ubatch-size / -ub "512 256 128"), ours --kv-unified at 512; then full 49152/64
#                 ours vs upstream at the best micro-batch (BEST_UB, else the smallest whose decode
#                 and TTFT stay within 5 % / 25 % of 512's): VRAM peak, single-stream decode, TTFT
#   kvq           cpu-moe 16384/16 with q8_0 K and V caches (--cache-type-k/-v; upstream -ctk/-ctv), ours
#                 vs upstream at each micro-batch of KVQ_UBS ("512 256"): VRAM peak, decode, TTFT
#   interactive64 one full worker (--parallel 64 --ctx-size 49152) behind the gateway: INTERACTIVE
#                 TTFT idle vs under I64_BG BATCH streams (60: the worker keeps 4 of 64 slots for
#                 INTERACTIVE), then at --parallel 68 --ctx-size 52224 (same 768-cell share) under 64
#   threads       cpu-moe single-stream decode at --threads THREAD_COUNTS ("8 12 16"), upstream at the best
#   prefix        bench/prefix-routing.sh (issue 17) with three full workers on the GPU
#   two-gpu       with 2+ GPUs: a gateway, a full worker on GPU 0 and a cpu-moe worker on GPU 1, the
#                 product check (moectl generate per class) and a mixed-class moe-bench run
#   gateway cpu-moe full n-cpu-moe invariance   the earlier stages (2026-12-01 has their results)
#   cpu-moe-ab    cpu-moe 16384/16 at 1 and 8 streams: ours sequential (native CPU backend), sequential
#                 and grouped (AVX2 backend), then upstream, AB_RPL (8) requests per level, AB_ROUNDS (1)
#                 rounds; the native row is skipped when the kernel stage ran and its native check failed
#                 then (AB_EXTRA=1) single-stream upstream --no-host and ours with OMP_WAIT_POLICY=ACTIVE
#   probe         (ours-only, not in the default STAGES) bench/cpu-invariance-probe.cpp built against
#                 our shared libraries, on a 2-layer model: one sequence vs 3, 8 or 16 rows per decode
#                 call, first differing tensor; CPU only (PROBE_BI on / off), the GPU with experts on
#                 the host (PROBE_CUDA_BI + PROBE_BI; op offload off for contrast), and with the AVX2
#                 CPU backend; results/probe.txt
#   kernel        (ours-only, not in the default STAGES; put it before cpu-moe-ab) bench/mxfp4-kernel-check.c
#                 built against our shared libraries: ggml-cpu's MXFP4 x Q8_0 vec_dot (patch 0003's AVX-512
#                 kernel in the native build) against a double-precision reference, with guard pages
#                 after and before the rows, and its one-core speed (in cache, streaming); native, then
#                 the AVX2 CPU backend; results/kernel.txt, results/kernel-native.ok when native passed
# On a machine with 2+ GPUs every stage but two-gpu runs on GPU 0 only (CUDA_VISIBLE_DEVICES=0,
# nvidia-smi -i 0), so numbers compare with single-GPU runs.
# env: WORK (/root/moe-gpu), BUDGET_S (deadline from start, 1500), RPL (requests per level, 16),
#      STAGES ("vram interactive64 threads prefix two-gpu gateway cpu-moe full n-cpu-moe"),
#      OURS_FLAGS (extra worker flags for every run), BATCHED_FLAG (the worker flag for batched
#      decode, "--decode-mode batched"; empty: skip the batched rows), SEQ_FLAG (the flag for the
#      full stage's ours-seq rows, "--decode-mode sequential"; empty: skip them), SEQ_LEVELS (their
#      stream counts, "1,16,64"), I64_GROUPED_ROWS (interactive64's runs, see stage_interactive64), INV_MODES (invariance.sh
#      MODES, "full cpu-moe"), LAYERS (24), VRAM_UBS, VRAM_RPL (8), BEST_UB, I64_BG (60),
#      I64_RPL (16), THREAD_COUNTS, THREADS_RPL (8), PREFIX_WORKER_ARGS ("--offload full --batch-size 128": sequential
#      decode reuses whole --batch-size chunks only, and the workload's prompts are < 512 tokens),
#      WAIT_READY (240s), UPSTREAM (1; 0: skip llama-server and build ours on all cores), AVX2_CPU (1: also build the AVX2 CPU backend for the ours-avx2 rows; 0 saves
#      build time and skips them), CPU_MOE_OURS (the cpu-moe stage's rows of ours run at 1,4,16
#      streams with RPL requests, e.g. "ours ours-avx2"; names starting ours-avx2 run with the AVX2
#      CPU backend; unset: "ours" at 1,4,16 and "ours-avx2" at 1 stream with RPL=8), NCM_OURS (the
#      n-cpu-moe stage's rows of ours, "ours"; e.g. "ours ours-avx2")
# DRY RUN (CPU, checks the stage logic): `dry-run CARRY_DIR` with CARRY_DIR holding the binaries
#      unpacked (moe-worker ... etcd, etcdctl; .xz not needed), MODEL set to a small GGUF (e.g.
#      scripts/make_gptoss_like.py OUT --layers 2 --sparse), SERVER a CPU llama-server (optional:
#      without one the upstream rows fail fast); FAKE_GPUS (1) GPUs the stub reports. It sets small
#      sizes (I64_PARALLEL, I64_CTX, I64_BG, PROMPT_TOKENS, ...) unless given; DRY_UPSTREAM_DELAY
#      (seconds) plays a llama-server build that long, to check which stages run meanwhile. The kernel
#      stage compiles against PREBUILT_LIBS with GGML_INCLUDE (e.g. llama-cpp-sys-2's llama.cpp/ggml/include).
set -uo pipefail
WORK=${WORK:-/root/moe-gpu}
R=$WORK/results
LOG=$WORK/pipeline.log

stage() { echo "[$(date +%T) +$(( $(date +%s) - ${T0:-$(date +%s)} ))s] $*"; }

case ${1:-} in
start)
  CARRY=${2:?carry dir}
  mkdir -p "$WORK" "$R"
  cp -f "$0" "$WORK/run.sh"
  cp -f bench/build-llama-server.sh bench/tables.py bench/lib.sh bench/gpu/memory.py bench/gpu/membw.c \
    bench/gpu/build-llama-shared.sh bench/gpu/invariance.sh bench/gpu/stages.py bench/cpu-invariance-probe.cpp \
    bench/mxfp4-kernel-check.c "$WORK/"
  # bench/prefix-routing.sh runs from a bench/ folder of its own (it sources ../bench/lib.sh).
  mkdir -p "$WORK/repo/bench" && cp -f bench/prefix-routing.sh bench/lib.sh "$WORK/repo/bench/"
  cp -fL "$CARRY"/* "$WORK/"
  echo "$(date +%s)" >"$WORK/t0"
  setsid nohup bash "$WORK/run.sh" pipeline >"$LOG" 2>&1 </dev/null &
  echo "pipeline started (pid $!), log $LOG"
  ;;
dry-run)
  # The pipeline on this machine, in the foreground, with a stub nvidia-smi and small sizes.
  CARRY=${2:?carry dir}
  : "${MODEL:?set MODEL to a small GGUF}"
  export WORK=${WORK:-/tmp/moe-gpu-dry} DRY_RUN=1 FAKE_GPUS=${FAKE_GPUS:-1}
  rm -rf "$WORK"; mkdir -p "$WORK/stub"
  cat >"$WORK/stub/nvidia-smi" <<'STUB'
#!/usr/bin/env bash
# Stub for dry runs: FAKE_GPUS GPUs, no memory in use.
case " $* " in
  *" -L "*) for ((i = 0; i < ${FAKE_GPUS:-1}; i++)); do echo "GPU $i: Stub GPU (UUID: GPU-stub-$i)"; done ;;
  *"-lms"*) while :; do echo 0; sleep 0.25; done ;;
  *"--query-gpu=name"*) echo "Stub GPU, 1000 MiB, 0.0" ;;
  *"--query-gpu="*) echo 0 ;;
  *) ;;
esac
STUB
  chmod +x "$WORK/stub/nvidia-smi"
  export PATH=$WORK/stub:$PATH
  export PREBUILT_LIBS=${PREBUILT_LIBS:-$WORK/stub} SERVER=${SERVER:-/bin/false} MEMBW_GIB=${MEMBW_GIB:-1}
  export RPL=${RPL:-2} VRAM_RPL=${VRAM_RPL:-2} I64_RPL=${I64_RPL:-2} PROMPT_TOKENS=${PROMPT_TOKENS:-48}
  export I64_PARALLEL=${I64_PARALLEL:-4} I64_CTX=${I64_CTX:-2048} I64_BG=${I64_BG:-3} I64_PARALLEL2=${I64_PARALLEL2:-5}
  export I64_CTX2=${I64_CTX2:-2560} I64_BG2=${I64_BG2:-4} I64_MAX_TOKENS=${I64_MAX_TOKENS:-4} BG_MAX_TOKENS=${BG_MAX_TOKENS:-8}
  export VRAM_CTX=${VRAM_CTX:-2048} VRAM_PAR=${VRAM_PAR:-4} FULL_CTX=${FULL_CTX:-2048} FULL_PAR=${FULL_PAR:-4}
  export CPU_MOE_MAX_TOKENS=${CPU_MOE_MAX_TOKENS:-8} FULL_MAX_TOKENS=${FULL_MAX_TOKENS:-8} WAIT_READY=${WAIT_READY:-120s}
  export THREAD_COUNTS=${THREAD_COUNTS:-1 2} THREADS_RPL=${THREADS_RPL:-2} MIX_RPL=${MIX_RPL:-2} MIX_BG=${MIX_BG:-2}
  export PREFIX_ENV=${PREFIX_ENV:-CONVERSATIONS=2 TURNS=2 FIRST_TOKENS=40 MAX_TOKENS=4 THREADS=1}
  bash "$0" start "$CARRY" || exit 1
  bash "$0" wait "${DRY_WAIT_S:-3000}"
  exit $?
  ;;
wait)
  LIMIT=${2:?seconds}
  END=$(( $(date +%s) + LIMIT ))
  SHOWN=0
  while :; do
    N=$(wc -l <"$LOG" 2>/dev/null || echo 0)
    if [ "$N" -gt "$SHOWN" ]; then sed -n "$((SHOWN + 1)),${N}p" "$LOG"; SHOWN=$N; fi
    [ -f "$WORK/DONE" ] || [ -f "$WORK/FAILED" ] && break
    [ "$(date +%s)" -ge "$END" ] && { echo "wait: still running after ${LIMIT}s"; break; }
    sleep 2
  done
  if [ -n "${OUT:-}" ]; then
    tar -czf "$OUT/results.tar.gz" -C "$WORK" results pipeline.log $(cd "$WORK" && ls *.log 2>/dev/null | grep -v pipeline.log) 2>/dev/null
    [ -f "$R/summary.md" ] && cp "$R/summary.md" "$OUT/"
    cp "$LOG" "$OUT/pipeline.log"
  fi
  [ -f "$R/summary.md" ] && cat "$R/summary.md"
  [ -f "$WORK/FAILED" ] && { echo "FAILED: $(cat "$WORK/FAILED")"; exit 1; }
  [ -f "$WORK/DONE" ] || exit 3
  ;;
pipeline) ;;
*) sed -n 2,60p "$0"; exit 64 ;;
esac
[ "${1:-}" = pipeline ] || exit 0

# ---------------------------------------------------------------- pipeline (detached)
cd "$WORK" || exit 1
source "$WORK/lib.sh"
T0=$(cat "$WORK/t0")
BUDGET_S=${BUDGET_S:-1500}
END_AT=$(( T0 + BUDGET_S ))
RPL=${RPL:-16}
PROMPT_TOKENS=${PROMPT_TOKENS:-512}
STAGES=${STAGES:-vram interactive64 threads prefix two-gpu gateway cpu-moe full n-cpu-moe}
OURS_FLAGS=${OURS_FLAGS:-}
BATCHED_FLAG=${BATCHED_FLAG---decode-mode batched}
SEQ_FLAG=${SEQ_FLAG---decode-mode sequential}
LAYERS=${LAYERS:-24}
NPROC=$(nproc)
HALF=$(( NPROC / 2 ))
MODEL=${MODEL:-$WORK/gptoss-$LAYERS.gguf}
fail() { stage "FAILED: $*"; echo "$*" >"$WORK/FAILED"; exit 1; }
left() { echo $(( END_AT - $(date +%s) )); }
# has_time SECONDS NAME: whether a stage of about SECONDS still fits the budget.
has_time() { [ "$(left)" -ge "$1" ] && return 0; stage "skipping $2: $(left)s left"; echo "$2: not run (time)" >>"$R/skipped.txt"; return 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_WAIT_POLICY=PASSIVE
CUDA_LIB=$(ls -d /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/local/cuda/targets/x86_64-linux/lib 2>/dev/null | head -1)
command -v nvcc >/dev/null || export PATH=$(dirname "$(ls /usr/local/cuda*/bin/nvcc | head -1)"):$PATH
unxz_to() { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"; }

stage "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | paste -sd';')"
stage "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), nproc $NPROC, flags: $(grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | paste -sd' ')"
for b in moe-worker moe-gateway moectl moe-bench etcd etcdctl; do
  if [ -f "$b.xz" ]; then unxz_to "$b.xz" "$b" && chmod +x "$b" || fail "unpacking $b"
  elif [ -x "$b" ]; then :   # a dry run carries them unpacked
  elif [ "$b" = etcdctl ]; then stage "carry lacks etcdctl: the prefix stage will not run"
  else fail "carry lacks $b.xz"; fi
done
# On a machine with several GPUs every stage but two-gpu runs on GPU 0 alone (comparable numbers).
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "$NGPU" -ge 2 ]; then export CUDA_VISIBLE_DEVICES=0; stage "$NGPU GPUs: stages pinned to GPU 0 (two-gpu uses 0 and 1)"; fi
SMI=(nvidia-smi -i 0)
WAIT_READY=${WAIT_READY:-240s}

# 1. Host read bandwidth, first, while nothing else runs.
stage "host memory read bandwidth"
gcc -O3 -march=native -fopenmp membw.c -o membw && ./membw "${MEMBW_GIB:-8}" "${MEMBW_RUNS:-5}" | tee "$R/membw.txt"

# 2. Both llama.cpp builds, on separate halves of the cores, while the model is generated.
stage "building ours (shared libs, CUDA, native CPU + an AVX2 CPU backend) on cores 0-$(( HALF - 1 )) and upstream llama-server (CUDA, native CPU) on cores $HALF-$(( NPROC - 1 ))"
# (A dry run elsewhere can pass PREBUILT_LIBS / PREBUILT_AVX2 / SERVER instead.)
# UPSTREAM=0: no llama-server build (its rows are skipped) and ours builds on every core.
OURS_CORES="0-$(( HALF - 1 ))"; OURS_JOBS=$HALF
[ "${UPSTREAM:-1}" = 0 ] && { OURS_CORES="0-$(( NPROC - 1 ))"; OURS_JOBS=$NPROC; }
if [ -n "${PREBUILT_LIBS:-}" ]; then echo 0 >ours.rc; else
( JOBS=$OURS_JOBS AVX2_CPU=${AVX2_CPU:-1} taskset -c "$OURS_CORES" bash build-llama-shared.sh ours-llama.cpp-src.tar.xz "$WORK/ll" \
    >build-ours.log 2>&1; echo $? >ours.rc ) &
fi
if [ "${UPSTREAM:-1}" = 0 ]; then echo "upstream: not built (UPSTREAM=0)" >>"$R/skipped.txt"; echo 1 >upstream.rc
elif [ -n "${SERVER:-}" ]; then ( sleep "${DRY_UPSTREAM_DELAY:-0}"; echo 0 >upstream.rc ) & else
( JOBS=$HALF CMAKE_CUDA_ARCHITECTURES=90 taskset -c "$HALF-$(( NPROC - 1 ))" bash build-llama-server.sh --cuda --cache "$WORK" \
    --src-tarball upstream-llama.cpp-src.tar.xz >build-upstream.log 2>&1; echo $? >upstream.rc ) &
fi
if [ ! -f "$MODEL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" gguf-*.whl || fail "installing gguf"
  stage "generating the synthetic gpt-oss-20b ($LAYERS layers)"
  PYTHONPATH=$WORK/site nice -n 5 python3 make_gptoss_like.py "$MODEL.tmp" --vocab-gguf ggml-vocab-gpt-2.gguf --layers "$LAYERS" \
    >make-model.log 2>&1 || { tail -5 make-model.log; fail "making the model"; }
  mv "$MODEL.tmp" "$MODEL"
fi
stage "model: $(du -h "$MODEL" | cut -f1)"

ETCD_PORT=$(free_port); ETCD_PEER=$(free_port)
./etcd --name moe --data-dir "$WORK/etcd-data" --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-cluster "moe=http://127.0.0.1:$ETCD_PEER" \
  >etcd.log 2>&1 &
ETCD_PID=$!
ETCD=http://127.0.0.1:$ETCD_PORT
wait_port "$ETCD_PORT" 20 "$ETCD_PID" || fail "starting etcd"

while [ ! -f ours.rc ]; do sleep 2; done
[ "$(cat ours.rc)" = 0 ] || { tail -30 build-ours.log; fail "building ours"; }
LIBS=${PREBUILT_LIBS:-$WORK/ll/build/bin}
mkdir -p "$WORK/cpu-avx2" && cp -a "${PREBUILT_AVX2:-$WORK/ll/build-avx2/bin}"/libggml-cpu.so* "$WORK/cpu-avx2/" \
  || stage "no AVX2 CPU backend: ours-avx2 rows will measure the native one"
export LD_LIBRARY_PATH=$LIBS${CUDA_LIB:+:$CUDA_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
stage "llama.cpp patches in ours: $(awk '{print $2}' llama-patches 2>/dev/null | paste -sd' ' || echo none)"
stage "ours built: $(ldd ./moe-worker | grep -E 'libllama|libggml' | awk '{print $3}' | paste -sd' ')"

VRAM_PID=
vram_start() { "${SMI[@]}" --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$1" 2>/dev/null & VRAM_PID=$!; }
vram_stop() { kill "$VRAM_PID" 2>/dev/null; wait "$VRAM_PID" 2>/dev/null; VRAM_PID=; sort -n "$1" | tail -1; }
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do stop_pid "$p"; done; PIDS=(); }
trap 'cleanup; [ -n "$VRAM_PID" ] && kill "$VRAM_PID"; kill "$ETCD_PID" 2>/dev/null' EXIT

worker_cmd() { # PROFILE PORT PARALLEL CTX ID [extra...]
  # env WTHREADS: llama threads (default all cores); UB: --ubatch-size (default the worker's, 512)
  local p=$1 port=$2 par=$3 ctx=$4 id=$5; shift 5
  echo ./moe-worker --model "$MODEL" --offload "$p" --listen "127.0.0.1:$port" --ctx-size "$ctx" --parallel "$par" \
       --threads "${WTHREADS:-$NPROC}" --batch-size 2048 ${UB:+--ubatch-size $UB} --max-queue 1024 --etcd "$ETCD" --id "$id" \
       --lease-ttl 5s $OURS_FLAGS "$@"
}
upstream_cmd() { # PROFILE PORT PARALLEL CTX   (env WTHREADS, UB as for worker_cmd)
  local extra=()
  case $1 in
    full) ;;
    cpu-moe) extra=(--cpu-moe -lm none) ;;                 # our worker loads host experts without mmap too
    n-cpu-moe:*) extra=(--n-cpu-moe "${1#n-cpu-moe:}" -lm none) ;;
  esac
  # UPSTREAM_EXTRA: more llama-server flags (the kvq stage's -ctk/-ctv).
  echo "$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$2" -c "$4" -np "$3" \
       --cont-batching --kv-unified -t "${WTHREADS:-$NPROC}" -tb "${WTHREADS:-$NPROC}" -b 2048 -ub "${UB:-512}" -ngl 999 \
       -fit off --no-webui -lv 4 "${extra[@]}" ${UPSTREAM_EXTRA:-}   # -lv 4: its context and buffer-size lines (≈26 lines a request)
}
memory_snapshot() { # LABEL
  sleep 6   # adverts refresh device memory every 5 s
  ./moectl workers --etcd "$ETCD" --json >"$R/advert-$1.jsonl" 2>>"$WORK/moectl.log"
  "${SMI[@]}" --query-compute-apps=pid,used_memory --format=csv,noheader,nounits >"$R/smi-$1.txt"
  python3 memory.py row "$1" "$R/smi-$1.txt" <"$R/advert-$1.jsonl" >>"$R/memory.md" || echo "| $1 | (no advert) |" >>"$R/memory.md"
}

# Memory lines llama.cpp logs at context creation (KV, compute and output buffers, SWA cells).
buffer_lines() { sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -E "n_ubatch|n_outputs_max|flash_attn|n_seq_max|KV cache, size|KV buffer size|compute buffer size|output buffer size|model buffer size|llama_kv_cache: +size" | head -60; }

# run_server NAME PROFILE CTX PARALLEL LEVELS MAX_TOKENS [worker flags...]
#   NAME: ours..., or upstream... (llama-server), e.g. ours-ub256, upstream-ub256, ours-t8. Env UB
#   and WTHREADS reach both. Writes $R/TAG.json (TAG = profile-ctx-NAME), a VRAM peak row
#   ($R/vram.tsv), llama.cpp's buffer sizes ($R/TAG-buffers.txt); ours also an advert/nvidia-smi
#   memory row.
run_server() {
  local name=$1 profile=$2 ctx=$3 par=$4 levels=$5 maxt=$6; shift 6
  local port cmd target tag pid base t peak
  port=$(free_port); tag=${profile//:/-}-$ctx-$name
  if [[ $name == upstream* ]]; then
    [ "$UPSTREAM_OK" = 1 ] || { echo "$tag: not run (no llama-server)" >>"$R/skipped.txt"; return 0; }
    cmd=$(upstream_cmd "$profile" "$port" "$par" "$ctx"); target=llama-server://127.0.0.1:$port
  else
    cmd=$(worker_cmd "$profile" "$port" "$par" "$ctx" "bench-$tag" "$@"); target=grpc://127.0.0.1:$port
  fi
  echo "$cmd" >>"$R/commands.txt"
  base=$("${SMI[@]}" --query-gpu=memory.used --format=csv,noheader,nounits)
  vram_start "$WORK/vram-$tag.txt"
  t=$(date +%s)
  # llama.cpp's own log lines (buffer sizes) come through the worker's tracing as llama-cpp-2.
  if [[ $name == ours-avx2* ]]; then
    LD_LIBRARY_PATH=$WORK/cpu-avx2:$LD_LIBRARY_PATH RUST_LOG=warn,moe_worker::engine=info,llama-cpp-2=info $cmd >"$WORK/server-$tag.log" 2>&1 &
  else
    RUST_LOG=warn,moe_worker::engine=info,llama-cpp-2=info $cmd >"$WORK/server-$tag.log" 2>&1 &
  fi
  pid=$!; PIDS=("$pid")
  local bench=(./moe-bench --target "$target" --concurrency "$levels" --requests-per-level "$RPL" --prompt-tokens "$PROMPT_TOKENS"
               --max-tokens "$maxt" --warmup 1 --wait-ready "$WAIT_READY" --request-timeout 200s --level-timeout 200s
               --label "$name $profile" --json "$R/$tag.json")
  echo "${bench[*]}" >>"$R/commands.txt"
  "${bench[@]}" >"$WORK/bench-$tag.log" 2>&1 || { stage "$name $profile: moe-bench failed"; tail -5 "$WORK/bench-$tag.log"; }
  tail -4 "$WORK/bench-$tag.log"
  buffer_lines "$WORK/server-$tag.log" >"$R/$tag-buffers.txt"
  if [[ $name != upstream* ]]; then
    memory_snapshot "$profile $ctx $name"
    grep -m3 -i "decode mode\|decode_mode\|sequential" "$WORK/server-$tag.log" >"$R/$tag-mode.txt"
  fi
  if [ -n "${BACKGROUND:-}" ]; then
    stage "$name $profile: $BACKGROUND BATCH streams vs INTERACTIVE requests"
    local bg=(./moe-bench --target "$target" --concurrency 1 --requests-per-level 8 --prompt-tokens "$PROMPT_TOKENS"
              --max-tokens 32 --warmup 1 --background-batch "$BACKGROUND" --background-max-tokens "${BG_MAX_TOKENS:-192}" --request-timeout 200s
              --level-timeout 150s --label "$name $profile, $BACKGROUND batch in background" --json "$R/$tag-background.json")
    echo "${bg[*]}" >>"$R/commands.txt"
    "${bg[@]}" >"$WORK/bench-$tag-background.log" 2>&1; tail -3 "$WORK/bench-$tag-background.log"
  fi
  cleanup
  peak=$(vram_stop "$WORK/vram-$tag.txt")
  echo -e "$profile\t$ctx\t$par\t$name\t$base\t$peak\t$(( $(date +%s) - t ))" >>"$R/vram.tsv"
  stage "$name $profile ctx $ctx: VRAM peak ${peak} MiB (baseline $base), $(( $(date +%s) - t ))s"
}

# The product on one GPU for issue 16: a `full` worker with 16 slots behind a gateway; 16 and 32
# concurrent requests of ~560 tokens must all be served (none refused), an INTERACTIVE request is
# measured idle and under 14 BATCH streams, and the gateway's overhead at 16 streams against
# calling the worker directly.
run_gateway() {
  local pw pg wpid gpid round via port
  pw=$(free_port); pg=$(free_port)
  RUST_LOG=warn $(worker_cmd full "$pw" 16 16384 gw-full) >"$WORK/gw-worker.log" 2>&1 &
  wpid=$!; PIDS=("$wpid")
  echo "$(worker_cmd full "$pw" 16 16384 gw-full)" >>"$R/commands.txt"
  RUST_LOG=warn ./moe-gateway --listen "127.0.0.1:$pg" --etcd "$ETCD" >"$WORK/gw-gateway.log" 2>&1 &
  gpid=$!; PIDS+=("$gpid")
  wait_port "$pg" 20 "$gpid" || { cleanup; echo "gateway: did not listen" >>"$R/skipped.txt"; return 1; }
  local b=(./moe-bench --target "grpc://127.0.0.1:$pg" --concurrency 16,32 --requests-per-level 32 --prompt-tokens 560
           --max-tokens 128 --warmup 1 --wait-ready 240s --request-timeout 200s --level-timeout 200s
           --label "16 slots via gateway" --json "$R/gw-admission.json")
  echo "${b[*]}" >>"$R/commands.txt"; "${b[@]}" >"$WORK/gw-admission.log" 2>&1; tail -4 "$WORK/gw-admission.log"
  b=(./moe-bench --target "grpc://127.0.0.1:$pg" --concurrency 1 --requests-per-level 8 --prompt-tokens 560 --max-tokens 32
     --warmup 1 --background-batch 14 --background-max-tokens 256 --request-timeout 200s --level-timeout 150s
     --label "interactive under 14 batch via gateway" --json "$R/gw-background-14.json")
  echo "${b[*]}" >>"$R/commands.txt"; "${b[@]}" >"$WORK/gw-background.log" 2>&1; tail -3 "$WORK/gw-background.log"
  for round in 1 2; do
    for via in direct gateway; do
      port=$pw; [ "$via" = gateway ] && port=$pg
      b=(./moe-bench --target "grpc://127.0.0.1:$port" --concurrency 16 --requests-per-level 32 --prompt-tokens 32
         --max-tokens 64 --warmup 1 --wait-ready 60s --level-timeout 120s --label "$via" --json "$R/overhead-$via-$round.json")
      echo "${b[*]}" >>"$R/commands.txt"; "${b[@]}" >"$WORK/overhead-$via-$round.log" 2>&1 || tail -3 "$WORK/overhead-$via-$round.log"
    done
  done
  memory_snapshot "gateway full 16384"
  cleanup
}

echo -e "profile\tctx\tparallel\tserver\tvram_base_mib\tvram_peak_mib\tseconds" >"$R/vram.tsv"
python3 memory.py header >"$R/memory.md"

stage "smoke test of our CUDA worker"
PORT=$(free_port)
$(worker_cmd full "$PORT" 4 8192 smoke) >smoke-worker.log 2>&1 &
SMOKE=$!
./moe-bench --target "grpc://127.0.0.1:$PORT" --concurrency 1 --requests-per-level 2 --prompt-tokens 64 --max-tokens 32 \
  --warmup 1 --wait-ready 180s --label smoke --json "$R/smoke.json" >smoke-bench.log 2>&1
RC=$?
tail -3 smoke-bench.log; grep -m5 -i "cuda\|decode mode\|sequential\|error" smoke-worker.log
stop_pid "$SMOKE"
[ "$RC" = 0 ] || { tail -20 smoke-worker.log; fail "smoke test of the CUDA worker (moe-bench rc $RC)"; }

UPSTREAM_OK=0 UPSTREAM_WAITED=0
# Waits for the llama-server build once; without it the upstream rows are skipped, ours still run.
wait_upstream() {
  [ "$UPSTREAM_WAITED" = 1 ] && return 0
  UPSTREAM_WAITED=1
  stage "waiting for llama-server"
  while [ ! -f upstream.rc ]; do sleep 2; done
  if [ "$(cat upstream.rc)" != 0 ]; then
    tail -20 build-upstream.log; stage "llama-server did not build: upstream rows skipped"
    echo "upstream: build failed" >>"$R/skipped.txt"; return 0
  fi
  SERVER=${SERVER:-$WORK/llama-server-cuda/bin/llama-server}
  "$SERVER" --version >"$R/llama-server-version.txt" 2>&1 || true
  [ -n "${DRY_RUN:-}" ] && [ "$SERVER" = /bin/false ] && { stage "dry run without llama-server: upstream rows skipped"; return 0; }
  UPSTREAM_OK=1
  stage "llama-server: $(grep -m1 version "$R/llama-server-version.txt")"
}

# vram: cpu-moe at 16384 cells / 16 sequences, ours vs upstream at each micro-batch, ours with
# unified KV for reference; then full at 49152/64 at the best micro-batch.
stage_vram() {
  local ub best ctx=${VRAM_CTX:-16384} par=${VRAM_PAR:-16} mt=${CPU_MOE_MAX_TOKENS:-64}
  for ub in ${VRAM_UBS:-512 256 128}; do
    has_time 150 "vram cpu-moe ub $ub" || return 0
    stage "vram: cpu-moe $ctx/$par, micro-batch $ub, ours and upstream"
    RPL=${VRAM_RPL:-8} UB=$ub run_server "ours-ub$ub" cpu-moe "$ctx" "$par" 1 "$mt"
    RPL=${VRAM_RPL:-8} UB=$ub run_server "upstream-ub$ub" cpu-moe "$ctx" "$par" 1 "$mt"
  done
  if has_time 90 "vram cpu-moe unified"; then
    stage "vram: cpu-moe $ctx/$par, ours with --kv-unified (reference; not batch-invariant on a GPU)"
    RPL=${VRAM_RPL:-8} UB=512 run_server ours-unified-ub512 cpu-moe "$ctx" "$par" 1 "$mt" --kv-unified
  fi
  best=${BEST_UB:-$(python3 stages.py best-ub "$R" "cpu-moe-$ctx" "${VRAM_UBS:-512 256 128}")}
  echo "$best" >"$R/best-ub.txt"
  has_time 150 "vram full ub $best" || return 0
  stage "vram: full ${FULL_CTX:-49152}/${FULL_PAR:-64} at the best micro-batch, $best"
  RPL=${VRAM_RPL:-8} UB=$best run_server "ours-ub$best" full "${FULL_CTX:-49152}" "${FULL_PAR:-64}" 1 "${FULL_MAX_TOKENS:-128}"
  RPL=${VRAM_RPL:-8} UB=$best run_server "upstream-ub$best" full "${FULL_CTX:-49152}" "${FULL_PAR:-64}" 1 "${FULL_MAX_TOKENS:-128}"
}

# kvq: cpu-moe at 16384 cells / 16 sequences with q8_0 K and V caches (--cache-type-k/-v, upstream's
# -ctk/-ctv), ours and upstream at each micro-batch of KVQ_UBS: the 2.5 GiB target with a
# quantized cache, VRAM at equal settings, and what q8_0 costs in speed.
stage_kvq() {
  local ub ctx=${VRAM_CTX:-16384} par=${VRAM_PAR:-16} mt=${CPU_MOE_MAX_TOKENS:-64}
  for ub in ${KVQ_UBS:-512 256}; do
    has_time 120 "kvq cpu-moe ub $ub" || return 0
    stage "kvq: cpu-moe $ctx/$par, q8_0 K and V caches, micro-batch $ub, ours and upstream"
    RPL=${VRAM_RPL:-8} UB=$ub run_server "ours-q8-ub$ub" cpu-moe "$ctx" "$par" 1 "$mt" --cache-type-k q8_0 --cache-type-v q8_0
    RPL=${VRAM_RPL:-8} UB=$ub UPSTREAM_EXTRA="-ctk q8_0 -ctv q8_0" run_server "upstream-q8-ub$ub" cpu-moe "$ctx" "$par" 1 "$mt"
  done
}

# run_interactive PARALLEL CTX BACKGROUND LABEL: one full worker behind a gateway; INTERACTIVE TTFT
# idle, then under BACKGROUND BATCH streams whose prompt + max tokens fit a sequence's share.
run_interactive() {
  local par=$1 ctx=$2 bg=$3 label=$4 pw pg cmd
  pw=$(free_port); pg=$(free_port)
  cmd=$(worker_cmd full "$pw" "$par" "$ctx" "i64-$label" ${GR:+--grouped-rows $GR})
  echo "$cmd" >>"$R/commands.txt"
  RUST_LOG=warn $cmd >"$WORK/i64-$label-worker.log" 2>&1 &
  PIDS=("$!")
  RUST_LOG=warn ./moe-gateway --listen "127.0.0.1:$pg" --etcd "$ETCD" >"$WORK/i64-$label-gateway.log" 2>&1 &
  PIDS+=("$!")
  wait_port "$pg" 20 "${PIDS[1]}" || { cleanup; echo "interactive64 $label: gateway did not listen" >>"$R/skipped.txt"; return 1; }
  local b=(./moe-bench --target "grpc://127.0.0.1:$pg" --concurrency 1 --requests-per-level "${I64_RPL:-16}"
           --prompt-tokens "$PROMPT_TOKENS" --max-tokens "${I64_MAX_TOKENS:-8}" --warmup 1 --wait-ready "$WAIT_READY"
           --background-batch "$bg" --background-max-tokens "${BG_MAX_TOKENS:-192}" --request-timeout 150s
           --level-timeout 200s --label "INTERACTIVE under $bg BATCH, --parallel $par --ctx-size $ctx via gateway"
           --json "$R/i64-$label.json")
  echo "${b[*]}" >>"$R/commands.txt"
  "${b[@]}" >"$WORK/i64-$label-bench.log" 2>&1 || { stage "interactive64 $label: moe-bench failed"; tail -5 "$WORK/i64-$label-bench.log"; }
  memory_snapshot "interactive full $ctx x$par"
  cleanup
  python3 stages.py background-check "$R/i64-$label.json" "$bg" "$label" | tee -a "$R/interactive64.txt"
}

# interactive64: INTERACTIVE TTFT idle vs under BATCH load on one full worker (--parallel 64, 768
# cells each). The worker keeps parallel/16 slots for INTERACTIVE, so 60 BATCH streams run at
# --parallel 64; 64 running BATCH streams need --parallel 68 (same share: --ctx-size 52224).
# I64_GROUPED_ROWS (e.g. "p64:16 p68:16 p68:64"; unset: "p64: p68:", the worker's default):
# which runs, each at --grouped-rows N where given (labels p64-gr16 ...), for the wait an
# INTERACTIVE prompt has behind one call of grouped decodes.
stage_interactive64() {
  local run label rows
  for run in ${I64_GROUPED_ROWS:-p64: p68:}; do
    IFS=: read -r label rows <<<"$run"
    has_time 200 "interactive64 $label${rows:+-gr$rows}" || return 0
    if [ "$label" = p64 ]; then
      stage "interactive64: --parallel ${I64_PARALLEL:-64} --ctx-size ${I64_CTX:-49152}, ${I64_BG:-60} BATCH in the background${rows:+, --grouped-rows $rows}"
      GR=$rows run_interactive "${I64_PARALLEL:-64}" "${I64_CTX:-49152}" "${I64_BG:-60}" "p64${rows:+-gr$rows}"
    else
      stage "interactive64: --parallel ${I64_PARALLEL2:-68} --ctx-size ${I64_CTX2:-52224}, ${I64_BG2:-64} BATCH in the background${rows:+, --grouped-rows $rows}"
      GR=$rows run_interactive "${I64_PARALLEL2:-68}" "${I64_CTX2:-52224}" "${I64_BG2:-64}" "p68${rows:+-gr$rows}"
    fi
  done
}

# threads: cpu-moe single-stream decode at several thread counts (ours), upstream at the best.
stage_threads() {
  local n best counts=""
  for n in ${THREAD_COUNTS:-8 12 16}; do
    [ "$n" -le "$NPROC" ] || continue
    has_time 75 "threads $n" || break
    RPL=${THREADS_RPL:-8} WTHREADS=$n run_server "ours-t$n" cpu-moe "${VRAM_CTX:-16384}" "${VRAM_PAR:-16}" 1 "${CPU_MOE_MAX_TOKENS:-64}"
    counts="$counts $n"
  done
  [ -n "$counts" ] || return 0
  best=$(python3 stages.py best-threads "$R" "cpu-moe-${VRAM_CTX:-16384}" "$counts")
  echo "$best" >"$R/best-threads.txt"
  has_time 75 "threads upstream $best" || return 0
  RPL=${THREADS_RPL:-8} WTHREADS=$best run_server "upstream-t$best" cpu-moe "${VRAM_CTX:-16384}" "${VRAM_PAR:-16}" 1 "${CPU_MOE_MAX_TOKENS:-64}"
}

# prefix: issue 17's chat-turn benchmark (bench/prefix-routing.sh, its own etcd, three workers on
# GPU 0), configured through that script's documented env only. CTX=8192: with the script's
# default 2048 / PARALLEL 4 a sequence has 512 tokens, and turn 4 (548-606 tokens with gpt-oss's
# tokenizer) was refused OUT_OF_RANGE in the 2026-12-01 second run; 8192 gives 2048 a sequence.
stage_prefix() {
  [ -x ./etcdctl ] || { echo "prefix: not run (no etcdctl in the carry)" >>"$R/skipped.txt"; return 0; }
  [ -f "$WORK/repo/bench/prefix-routing.sh" ] || { echo "prefix: not run (no bench/prefix-routing.sh)" >>"$R/skipped.txt"; return 0; }
  has_time 240 prefix || return 0
  stage "prefix: bench/prefix-routing.sh, three full workers (${PREFIX_WORKER_ARGS:---offload full --batch-size 128})"
  ( cd "$WORK/repo" && env THREADS=4 CTX=8192 ${PREFIX_ENV:-} BIN_DIR="$WORK" ETCD_BIN="$WORK/etcd" ETCDCTL_BIN="$WORK/etcdctl" MODEL="$MODEL" \
      WORKER_ARGS="${PREFIX_WORKER_ARGS:---offload full --batch-size 128}" DOC="$R/prefix-routing.md" OUTDIR="$R/prefix" \
      GIT_COMMIT="$(cat "$WORK/git-commit" 2>/dev/null || echo unknown)" \
      timeout "$(( $(left) - 20 ))" bash bench/prefix-routing.sh ) >"$WORK/prefix.log" 2>&1 \
    || { stage "prefix: failed (rc $?)"; tail -15 "$WORK/prefix.log"; echo "prefix: failed, see prefix.log" >>"$R/skipped.txt"; }
  grep -A12 -m1 "^| turn" "$R/prefix-routing.md" 2>/dev/null | head -14
}

# two-gpu: the product on two GPUs: one gateway, a full worker on GPU 0, a cpu-moe worker on GPU 1.
stage_two_gpu() {
  [ "$NGPU" -ge 2 ] || { echo "two-gpu: not run ($NGPU GPU)" >>"$R/skipped.txt"; return 0; }
  has_time 240 two-gpu || return 0
  stage "two-gpu: gateway, full worker on GPU 0, cpu-moe worker on GPU 1"
  local pf pc pg cf cc class line ok=1
  pf=$(free_port); pc=$(free_port); pg=$(free_port)
  cf=$(worker_cmd full "$pf" 16 16384 gpu0-full); cc=$(worker_cmd cpu-moe "$pc" 16 16384 gpu1-cpu-moe)
  echo "CUDA_VISIBLE_DEVICES=0 $cf" >>"$R/commands.txt"; echo "CUDA_VISIBLE_DEVICES=1 $cc" >>"$R/commands.txt"
  CUDA_VISIBLE_DEVICES=0 RUST_LOG=warn $cf >"$WORK/two-gpu-full.log" 2>&1 &
  PIDS=("$!")
  CUDA_VISIBLE_DEVICES=1 RUST_LOG=warn $cc >"$WORK/two-gpu-cpu-moe.log" 2>&1 &
  PIDS+=("$!")
  RUST_LOG=warn ./moe-gateway --listen "127.0.0.1:$pg" --etcd "$ETCD" >"$WORK/two-gpu-gateway.log" 2>&1 &
  PIDS+=("$!")
  local p
  for p in "$pf" "$pc"; do   # each worker ready (a tiny request straight to it)
    ./moe-bench --target "grpc://127.0.0.1:$p" --concurrency 1 --requests-per-level 1 --prompt-tokens 16 --max-tokens 4 \
      --warmup 0 --wait-ready "$WAIT_READY" --label ready >>"$WORK/two-gpu-ready.log" 2>&1 || stage "two-gpu: worker on port $p not ready"
  done
  sleep 6   # adverts
  ./moectl workers --etcd "$ETCD" --json >"$R/two-gpu-adverts.jsonl" 2>>"$WORK/moectl.log"
  ./moectl workers --etcd "$ETCD" >"$R/two-gpu-workers.txt" 2>>"$WORK/moectl.log"
  nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader >"$R/two-gpu-smi.txt" 2>&1
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader >>"$R/two-gpu-smi.txt" 2>&1
  : >"$R/two-gpu-product.txt"
  for class in interactive batch interactive batch; do
    line=$(./moectl generate --gateway "127.0.0.1:$pg" --class "$class" --max-tokens 16 "The product check on two GPUs" 2>&1 | tail -1)
    echo "$class -> $line" | tee -a "$R/two-gpu-product.txt"
    case $class in
      interactive) [[ $line == *"profile=full"* ]] || ok=0 ;;
      batch) [[ $line == *"profile=cpu-moe"* ]] || ok=0 ;;
    esac
  done
  [ "$ok" = 1 ] && echo "PASS: INTERACTIVE on full (GPU 0), BATCH on cpu-moe (GPU 1)" | tee -a "$R/two-gpu-product.txt" \
    || echo "FAIL: a request landed on the other profile" | tee -a "$R/two-gpu-product.txt"
  # Mixed classes: INTERACTIVE at 1 and 4 streams measured while BATCH streams run in the background.
  local b=(./moe-bench --target "grpc://127.0.0.1:$pg" --concurrency 1,4 --requests-per-level "${MIX_RPL:-16}" --prompt-tokens "$PROMPT_TOKENS"
           --max-tokens 32 --warmup 1 --wait-ready "$WAIT_READY" --background-batch "${MIX_BG:-15}" --background-max-tokens 64
           --request-timeout 200s --level-timeout 200s --label "two GPUs: INTERACTIVE under ${MIX_BG:-15} BATCH via gateway"
           --json "$R/two-gpu-mixed.json")
  echo "${b[*]}" >>"$R/commands.txt"
  ( sleep 40; ./moectl workers --etcd "$ETCD" --json >"$R/two-gpu-adverts-under-load.jsonl" 2>>"$WORK/moectl.log" ) &
  local snap=$!
  "${b[@]}" >"$WORK/two-gpu-mixed.log" 2>&1 || { stage "two-gpu: mixed run failed"; tail -5 "$WORK/two-gpu-mixed.log"; }
  wait "$snap" 2>/dev/null
  tail -4 "$WORK/two-gpu-mixed.log"
  python3 stages.py background-check "$R/two-gpu-mixed.json" "${MIX_BG:-15}" two-gpu-mixed | tee -a "$R/two-gpu-product.txt"
  cleanup
}

stage_invariance() {
  has_time 300 invariance || return 0
  stage "batch invariance (modes: ${INV_MODES:-full cpu-moe})"
  MAX_TOKENS=${INV_MAX_TOKENS:-64} MODES=${INV_MODES:-full cpu-moe} MODEL=$MODEL WORK=$WORK WORKER_BIN=$WORK/moe-worker LLAMA_LIB_DIR=$LIBS LAYERS=$LAYERS \
    AVX2_LIB_DIR=$WORK/cpu-avx2 \
    bash invariance.sh "$WORK" "$R/invariance" >invariance-run.log 2>&1
  tail -8 "$R/invariance/invariance.md" 2>/dev/null || tail -20 invariance-run.log
}

have_avx2() { ls "$WORK"/cpu-avx2/libggml-cpu.so* >/dev/null 2>&1; }

# cpu-moe: CPU_MOE_OURS unset: ours at 1,4,16 streams and ours-avx2 at 1 stream (RPL=8), as
# before; set: each of its names at 1,4,16 streams with RPL requests (ours-avx2*: the AVX2 backend).
stage_cpu_moe() {
  has_time 330 cpu-moe || return 0
  local name
  if [ -z "${CPU_MOE_OURS+x}" ]; then
    stage "cpu-moe at 16384 cells / 16 sequences: ours, ours with AVX2 CPU code, upstream"
    run_server ours cpu-moe 16384 16 1,4,16 64
    if have_avx2; then RPL=8 run_server ours-avx2 cpu-moe 16384 16 1 64
    else echo "cpu-moe ours-avx2: not run (no AVX2 CPU backend built: AVX2_CPU=0)" >>"$R/skipped.txt"; fi
  else
    stage "cpu-moe at 16384 cells / 16 sequences: ${CPU_MOE_OURS:-no ours rows} at 1,4,16 streams, upstream"
    for name in $CPU_MOE_OURS; do
      if [[ $name == ours-avx2* ]] && ! have_avx2; then
        echo "cpu-moe $name: not run (no AVX2 CPU backend built: AVX2_CPU=0)" >>"$R/skipped.txt"; continue
      fi
      has_time 100 "cpu-moe $name" || return 0
      run_server "$name" cpu-moe 16384 16 1,4,16 64
    done
  fi
  run_server upstream cpu-moe 16384 16 1,4,16 64
}

# cpu-moe-ab: what a cpu-moe decode costs per CPU backend and per decode mode, in one lease (the
# eighth run's grouped row was 0.60x upstream, with neither separated): ours sequential on the
# native and on the AVX2 CPU backend, and grouped on the AVX2 one (the worker allows grouped with
# host experts only on an AVX2-without-AVX-512 ggml-cpu), then upstream (its own native CPU code;
# run_server skips it without a llama-server), at 1 and 8 streams, AB_RPL (8) requests per level,
# AB_ROUNDS (1) rounds in that order. When the kernel stage's native MXFP4 check ran and failed
# (results/kernel.txt has its "=== native" run but there is no results/kernel-native.ok; a failed
# compile does not count), the native row is skipped: a wrong AVX-512 kernel's speed means
# nothing. Measures host CPU speed: waits for the llama-server build like the upstream stages.
stage_cpu_moe_ab() {
  have_avx2 || { echo "cpu-moe-ab: not run (no AVX2 CPU backend built: AVX2_CPU=0)" >>"$R/skipped.txt"; return 0; }
  local round native=1
  if [ -f "$R/kernel.txt" ] && [ ! -f "$R/kernel-native.ok" ] && grep -q '^=== native' "$R/kernel.txt"; then
    native=0
    stage "cpu-moe-ab: the native MXFP4 kernel check failed (results/kernel.txt): no ours-seq rows"
  fi
  for round in $(seq 1 "${AB_ROUNDS:-1}"); do
    has_time 300 "cpu-moe-ab round $round" || return 0
    stage "cpu-moe-ab round $round: $([ "$native" = 1 ] && echo 'sequential native, ')sequential AVX2, grouped AVX2, upstream"
    if [ "$native" = 1 ]; then
      RPL=${AB_RPL:-8} run_server "ours-seq-r$round" cpu-moe 16384 16 1,8 64 --decode-mode sequential
    else
      echo "cpu-moe-16384-ours-seq-r$round: not run (native MXFP4 kernel check failed, see kernel.txt)" >>"$R/skipped.txt"
    fi
    RPL=${AB_RPL:-8} run_server "ours-avx2-seq-r$round" cpu-moe 16384 16 1,8 64 --decode-mode sequential
    RPL=${AB_RPL:-8} run_server "ours-avx2-grouped-r$round" cpu-moe 16384 16 1,8 64 --decode-mode grouped
    RPL=${AB_RPL:-8} run_server "upstream-r$round" cpu-moe 16384 16 1,8 64
  done
  # Two single-stream questions after the rounds (AB_EXTRA=0 skips them):
  # - upstream with --no-host: host experts in the CPU_REPACK buffer (the interleaved mxfp4_8x8
  #   gemv) instead of CUDA's pinned host buffer (vec_dot per row); a repacked buffer is not
  #   host memory to the scheduler, so prompts' expert products stay on the CPU (TTFT's price);
  # - ours sequential with OMP_WAIT_POLICY=ACTIVE: the decoding threads spin between the 24 CPU
  #   splits of a token instead of sleeping (what the CPU part's fixed cost is made of).
  [ "${AB_EXTRA:-1}" = 1 ] || return 0
  has_time 100 "cpu-moe-ab upstream --no-host" \
    && UPSTREAM_EXTRA=--no-host RPL=${AB_RPL:-8} run_server upstream-nohost cpu-moe 16384 16 1 64
  if [ "$native" = 1 ] && has_time 100 "cpu-moe-ab ours spin"; then
    OMP_WAIT_POLICY=ACTIVE RPL=${AB_RPL:-8} run_server ours-seq-spin cpu-moe 16384 16 1 64 --decode-mode sequential
  fi
}

# cpu-moe-ab2: a single-stream repeat of cpu-moe-ab's AVX2 rows in another order, with and without
# OMP_WAIT_POLICY=ACTIVE (for a warm machine whose builds are reused: PREBUILT_LIBS, PREBUILT_AVX2).
stage_cpu_moe_ab2() {
  have_avx2 || return 0
  has_time 60 "cpu-moe-ab2 grouped spin" && OMP_WAIT_POLICY=ACTIVE RPL=${AB_RPL:-8} run_server ours-avx2-grouped-spin cpu-moe 16384 16 1 64 --decode-mode grouped
  has_time 60 "cpu-moe-ab2 seq" && RPL=${AB_RPL:-8} run_server ours-avx2-seq-b cpu-moe 16384 16 1 64 --decode-mode sequential
  has_time 60 "cpu-moe-ab2 grouped" && RPL=${AB_RPL:-8} run_server ours-avx2-grouped-b cpu-moe 16384 16 1 64 --decode-mode grouped
  has_time 60 "cpu-moe-ab2 seq spin" && OMP_WAIT_POLICY=ACTIVE RPL=${AB_RPL:-8} run_server ours-avx2-seq-spin cpu-moe 16384 16 1 64 --decode-mode sequential
  return 0
}

stage_full() {
  if has_time 300 full; then
    stage "full at 49152 cells / 64 sequences"
    run_server ours full 49152 64 1,4,16,64 128
    run_server upstream full 49152 64 1,4,16,64 128
  fi
  if [ -n "$SEQ_FLAG" ] && has_time 200 full-sequential; then
    stage "full, ours with one llama.cpp call per sequence (the decode mode before grouped), for the A/B"
    run_server ours-seq full 49152 64 "${SEQ_LEVELS:-1,16,64}" 128 $SEQ_FLAG
  fi
  if [ -n "$BATCHED_FLAG" ] && has_time 120 full-batched; then
    stage "full, ours with batched decode (not batch-invariant on the GPU), for the invariance trade-off"
    run_server ours-batched full 49152 64 16,64 128 $BATCHED_FLAG
  fi
}

# n-cpu-moe: NCM_OURS ("ours") are our rows (ours-avx2*: the AVX2 backend), then upstream.
stage_n_cpu_moe() {
  has_time 240 n-cpu-moe || return 0
  local name ncm=${NCM_OURS-ours}
  stage "n-cpu-moe:12 at 64 streams: ${ncm:-no ours rows}, upstream"
  for name in $ncm; do
    if [[ $name == ours-avx2* ]] && ! have_avx2; then
      echo "n-cpu-moe $name: not run (no AVX2 CPU backend built: AVX2_CPU=0)" >>"$R/skipped.txt"; continue
    fi
    has_time 80 "n-cpu-moe $name" || return 0
    RPL=64 run_server "$name" n-cpu-moe:12 49152 64 64 64
  done
  RPL=64 run_server upstream n-cpu-moe:12 49152 64 64 64
}

# probe: bench/cpu-invariance-probe.cpp against our shared libraries (CPU and CUDA), on a 2-layer
# model: the first tensor of a sequence's row that differs between decode calls of 1 and N rows.
# Never fails the pipeline: a failed build or run is logged in $R/probe.txt.
probe_run() { # LABEL ENV... -- ARGS...   (runs ./probe under timeout 150, output to $R/probe.txt)
  local label=$1 envs=() rc; shift
  while [ "$#" -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  has_time 160 "probe $label" || return 0
  ( cd "$WORK" && env "${envs[@]}" timeout 150 ./probe "$@" ) >"$WORK/probe-run.txt" 2>&1
  rc=$?
  { echo "=== $label: ${envs[*]} ./probe $*"; cat "$WORK/probe-run.txt"
    [ "$rc" = 0 ] || echo "(rc $rc$([ "$rc" = 124 ] && echo ': timed out after 150 s'))"; } >>"$R/probe.txt"
  stage "probe $label: rc $rc, $(grep -o 'greedy tokens equal.*' "$WORK/probe-run.txt" || tail -1 "$WORK/probe-run.txt")"
  return 0
}
stage_probe() {
  has_time 240 probe || return 0
  stage "probe: bench/cpu-invariance-probe.cpp against our libraries, 2-layer model"
  local P=$R/probe.txt avx2
  echo "# bench/cpu-invariance-probe.cpp, libraries $LIBS, model $WORK/g2.gguf (2 layers)" >>"$P"
  if ! ( cd "$WORK" && g++ -O1 -std=c++17 cpu-invariance-probe.cpp -I"$WORK/ll/llama.cpp/include" -I"$WORK/ll/llama.cpp/ggml/include" \
           -L"$LIBS" -lllama -lggml -lggml-base -Wl,-rpath,"$LIBS" -Wl,--enable-new-dtags -fopenmp -o probe ) >"$WORK/probe-build.log" 2>&1; then
    { echo "probe: compile failed:"; tail -20 "$WORK/probe-build.log"; } >>"$P"
    stage "probe: compile failed (probe-build.log)"; echo "probe: compile failed" >>"$R/skipped.txt"; return 0
  fi
  if [ ! -f "$WORK/g2.gguf" ]; then
    [ -f "$WORK/site/gguf/__init__.py" ] || ( cd "$WORK" && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --target "$WORK/site" gguf-*.whl ) >>"$WORK/probe-model.log" 2>&1
    ( cd "$WORK" && PYTHONPATH=$WORK/site timeout 300 python3 make_gptoss_like.py "$WORK/g2.gguf.tmp" --layers 2 \
        --vocab-gguf ggml-vocab-gpt-2.gguf ) >>"$WORK/probe-model.log" 2>&1 && mv "$WORK/g2.gguf.tmp" "$WORK/g2.gguf" || {
      { echo "probe: making the 2-layer model failed:"; tail -5 "$WORK/probe-model.log"; } >>"$P"
      stage "probe: making the 2-layer model failed (probe-model.log)"; echo "probe: no model" >>"$R/skipped.txt"; return 0; }
  fi
  # a. CPU only, native CPU backend: batch-invariant mode on (1 vs 8, 3 vs 8 rows), then off.
  probe_run "cpu bi 1v8" CUDA_VISIBLE_DEVICES= PROBE_THREADS=8 PROBE_BI=1 -- g2.gguf 1 1 8 64
  probe_run "cpu bi 3v8" CUDA_VISIBLE_DEVICES= PROBE_THREADS=8 PROBE_BI=1 -- g2.gguf 1 3 8 64
  probe_run "cpu off 1v8" CUDA_VISIBLE_DEVICES= PROBE_THREADS=8 -- g2.gguf 1 1 8 64
  # b. GPU, routed experts in host memory (--cpu-moe), CUDA and CPU batch-invariant modes on.
  local gpu=(PROBE_THREADS=16 PROBE_NGL=99 PROBE_CPU_MOE=1 PROBE_CUDA_BI=16 PROBE_BI=1)
  probe_run "gpu cpu-moe bi 1v16" "${gpu[@]}" -- g2.gguf 1 1 16 64
  probe_run "gpu cpu-moe bi 1v8" "${gpu[@]}" -- g2.gguf 1 1 8 64
  probe_run "gpu cpu-moe bi no-offload 1v16" "${gpu[@]}" PROBE_NO_OFFLOAD=1 -- g2.gguf 1 1 16 64
  # the same as the first, with whole graphs (kernel fusion, as the worker runs) except the recorded call
  probe_run "gpu cpu-moe bi cb-last 1v16" "${gpu[@]}" PROBE_CB_LAST=1 -- g2.gguf 1 1 16 64
  # c. the AVX2 CPU backend (first on LD_LIBRARY_PATH; the result line's cpu_features shows which loaded).
  if have_avx2; then
    avx2=LD_LIBRARY_PATH=$WORK/cpu-avx2:$LD_LIBRARY_PATH
    echo "probe: with the AVX2 backend: $(cd "$WORK" && env "$avx2" ldd ./probe | grep -o 'libggml-cpu[^ ]* => [^ ]*')" >>"$P"
    probe_run "avx2 cpu bi 1v8" "$avx2" CUDA_VISIBLE_DEVICES= PROBE_THREADS=8 PROBE_BI=1 -- g2.gguf 1 1 8 64
    probe_run "avx2 gpu cpu-moe bi 1v16" "$avx2" "${gpu[@]}" -- g2.gguf 1 1 16 64
  else
    echo "probe: no AVX2 CPU backend in $WORK/cpu-avx2 (AVX2_CPU=0): AVX2 runs not run" >>"$P"
  fi
  return 0
}

# kernel: bench/mxfp4-kernel-check.c against our shared libraries: ggml-cpu's MXFP4 x Q8_0 vec_dot
# (patch 0003's AVX-512 kernel in the native build, the AVX2 one in $WORK/cpu-avx2) against a
# double-precision reference, rows next to PROT_NONE guard pages, and its one-core speed. Pinned
# to core 0 (the llama-server build, which may still run, has the upper half of the cores; its
# memory traffic can still lower the streaming figure). GGML_INCLUDE: ggml's headers (default
# $WORK/ll/llama.cpp/ggml/include, our source; a dry run with PREBUILT_LIBS passes its own). Never
# fails the pipeline: results/kernel.txt; results/kernel-native.ok only when the native run passed
# (cpu-moe-ab reads it).
kernel_run() { # LABEL [ENV...]   (runs ./mxfp4-kernel-check under timeout 120, output to $R/kernel.txt)
  local label=$1 rc; shift
  ( cd "$WORK" && env "$@" timeout 120 taskset -c 0 ./mxfp4-kernel-check ) >"$WORK/kernel-run.txt" 2>&1
  rc=$?
  { echo "=== $label: $* taskset -c 0 ./mxfp4-kernel-check"; cat "$WORK/kernel-run.txt"
    [ "$rc" = 0 ] || echo "(rc $rc$([ "$rc" = 124 ] && echo ': timed out after 120 s'))"; } >>"$R/kernel.txt"
  stage "kernel $label: $(grep -m1 '^mxfp4 vec_dot:' "$WORK/kernel-run.txt" || echo "rc $rc, no result line: $(tail -1 "$WORK/kernel-run.txt")")"
  [ "$rc" = 0 ] || echo "kernel $label: check failed (rc $rc), see kernel.txt" >>"$R/skipped.txt"
  return "$rc"
}
stage_kernel() {
  has_time 60 kernel || return 0
  stage "kernel: bench/mxfp4-kernel-check.c against our libraries (MXFP4 x Q8_0 vec_dot, native and AVX2)"
  local K=$R/kernel.txt inc=${GGML_INCLUDE:-$WORK/ll/llama.cpp/ggml/include}
  rm -f "$R/kernel-native.ok"
  echo "# bench/mxfp4-kernel-check.c, libraries $LIBS, headers $inc" >>"$K"
  if ! ( cd "$WORK" && gcc -O2 -std=c11 mxfp4-kernel-check.c -I"$inc" -L"$LIBS" -lggml-cpu -lggml-base \
           -Wl,-rpath,"$LIBS" -Wl,--enable-new-dtags -lm -o mxfp4-kernel-check ) >"$WORK/kernel-build.log" 2>&1; then
    { echo "kernel: compile failed:"; tail -20 "$WORK/kernel-build.log"; } >>"$K"
    stage "kernel: compile failed (kernel-build.log)"; echo "kernel: compile failed" >>"$R/skipped.txt"; return 0
  fi
  echo "kernel: native: $(cd "$WORK" && ldd ./mxfp4-kernel-check | grep -o 'libggml-cpu[^ ]* => [^ ]*')" >>"$K"
  kernel_run native && touch "$R/kernel-native.ok"
  if have_avx2; then
    local avx2=LD_LIBRARY_PATH=$WORK/cpu-avx2:$LD_LIBRARY_PATH
    echo "kernel: avx2: $(cd "$WORK" && env "$avx2" ldd ./mxfp4-kernel-check | grep -o 'libggml-cpu[^ ]* => [^ ]*')" >>"$K"
    kernel_run avx2 "$avx2"
  else
    echo "kernel: no AVX2 CPU backend in $WORK/cpu-avx2 (AVX2_CPU=0): AVX2 run not run" >>"$K"
  fi
  return 0
}

run_stage() {
  case $1 in
    vram) stage_vram ;;
    kvq) stage_kvq ;;
    interactive64) stage_interactive64 ;;
    threads) stage_threads ;;
    prefix) stage_prefix ;;
    two-gpu) stage_two_gpu ;;
    gateway) has_time 240 gateway && { stage "gateway: 16/32 on 16 slots, interactive under 14 batch, overhead at 16 streams"; run_gateway; } ;;
    invariance) stage_invariance ;;
    cpu-moe) stage_cpu_moe ;;
    cpu-moe-ab) stage_cpu_moe_ab ;;
    cpu-moe-ab2) stage_cpu_moe_ab2 ;;
    full) stage_full ;;
    n-cpu-moe) stage_n_cpu_moe ;;
    probe) stage_probe ;;
    kernel) stage_kernel ;;
    *) stage "unknown stage $1"; echo "$1: unknown stage" >>"$R/skipped.txt" ;;
  esac
}

# Stages in STAGES order; while llama-server still builds (on the other half of the cores), the
# first stage that does not need it. Stages that measure host CPU speed or compare with upstream
# wait for the build, so it takes no cores from them.
OURS_ONLY=" invariance gateway interactive64 prefix two-gpu probe kernel "
read -r -a REMAINING <<<"$STAGES"
while [ "${#REMAINING[@]}" -gt 0 ]; do
  PICK=
  if [ "$UPSTREAM_WAITED" = 1 ] || [ -f upstream.rc ]; then
    PICK=${REMAINING[0]}
  else
    for s in "${REMAINING[@]}"; do [[ $OURS_ONLY == *" $s "* ]] && { PICK=$s; break; }; done
  fi
  if [ -z "$PICK" ]; then wait_upstream; continue; fi
  NEXT=(); for s in "${REMAINING[@]}"; do [ "$s" = "$PICK" ] || NEXT+=("$s"); done; REMAINING=("${NEXT[@]}")
  [[ $OURS_ONLY == *" $PICK "* ]] || wait_upstream
  stage "stage $PICK"
  echo "$PICK at +$(( $(date +%s) - T0 ))s, $([ -f upstream.rc ] && echo after || echo during) the llama-server build" >>"$R/stages.txt"
  run_stage "$PICK"
done

{
  echo "Device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), nproc $NPROC"
  echo "Host read bandwidth: $(cat "$R/membw.txt" 2>/dev/null)"
  echo "llama-server: $(grep -m2 -i 'version\|built' "$R/llama-server-version.txt" | paste -sd' ')"
  echo "Stages: $(paste -sd';' "$R/stages.txt" 2>/dev/null)"
  echo
  if grep -q 'ub[0-9]' "$R/vram.tsv" 2>/dev/null; then
    echo "### vram: ours vs upstream at equal settings per micro-batch (best: $(cat "$R/best-ub.txt" 2>/dev/null))"
    echo
    python3 stages.py vram-table "$R"
    echo
  fi
  for pair in $(for u in ${VRAM_UBS:-512 256 128}; do echo "cpu-moe-${VRAM_CTX:-16384}:ours-ub$u:upstream-ub$u"; done) \
              "cpu-moe-${VRAM_CTX:-16384}:ours-unified-ub512:ours-ub512" \
              "full-${FULL_CTX:-49152}:ours-ub$(cat "$R/best-ub.txt" 2>/dev/null):upstream-ub$(cat "$R/best-ub.txt" 2>/dev/null)" \
              "cpu-moe-${VRAM_CTX:-16384}:ours-t$(cat "$R/best-threads.txt" 2>/dev/null):upstream-t$(cat "$R/best-threads.txt" 2>/dev/null)"; do
    IFS=: read -r p a b <<<"$pair"
    [ -f "$R/$p-$a.json" ] && [ -f "$R/$p-$b.json" ] || continue
    echo "### $p: $a vs $b"
    echo
    python3 tables.py side-by-side "$R/$p-$a.json" "$R/$p-$b.json"
    echo
  done
  if ls "$R"/cpu-moe-*-ours-t*.json >/dev/null 2>&1; then
    echo "### threads: cpu-moe single-stream decode (best: $(cat "$R/best-threads.txt" 2>/dev/null))"
    echo
    python3 stages.py runs "$R"/cpu-moe-*-ours-t*.json "$R"/cpu-moe-*-upstream-t*.json
    echo
  fi
  if [ -f "$R/interactive64.txt" ]; then
    echo "### interactive64: INTERACTIVE TTFT idle vs under BATCH load, one full worker via the gateway"
    echo
    cat "$R/interactive64.txt"
    echo
    for f in "$R"/i64-p64.json "$R"/i64-p68.json; do [ -f "$f" ] && { echo "$(basename "$f"):"; echo; python3 tables.py background "$f"; echo; }; done
  fi
  if [ -f "$R/two-gpu-product.txt" ]; then
    echo "### two-gpu: gateway, full worker on GPU 0, cpu-moe worker on GPU 1"
    echo
    echo '```'; cat "$R/two-gpu-product.txt" "$R/two-gpu-workers.txt" "$R/two-gpu-smi.txt" 2>/dev/null; echo '```'
    echo
    [ -f "$R/two-gpu-mixed.json" ] && { python3 tables.py background "$R/two-gpu-mixed.json"; echo; }
  fi
  if [ -f "$R/prefix-routing.md" ]; then
    echo "### prefix: bench/prefix-routing.sh on the GPU (its report follows)"
    echo
    sed 's/^#/###/' "$R/prefix-routing.md"
    echo
  fi
  for pair in "cpu-moe-16384 ours-avx2-seq-r1 ours-seq-r1" "cpu-moe-16384 ours-avx2-grouped-r1 ours-avx2-seq-r1" \
              "cpu-moe-16384 ours-seq-r1 upstream-r1" "cpu-moe-16384 ours-avx2-grouped-r1 upstream-r1" "cpu-moe-16384 upstream-nohost upstream-r1" "cpu-moe-16384 ours-seq-spin ours-seq-r1" \
              "cpu-moe-16384 ours upstream" "cpu-moe-16384 ours-avx2 ours" "cpu-moe-16384 ours-t$(( NPROC / 4 )) ours" \
              "cpu-moe-16384 ours-t$HALF ours" "full-49152 ours upstream" "full-49152 ours-batched upstream" \
              "full-49152 ours ours-batched" "full-49152 ours ours-seq" "n-cpu-moe-12-49152 ours upstream" \
              "cpu-moe-16384 ours-avx2 upstream" "n-cpu-moe-12-49152 ours-avx2 upstream"; do
    set -- $pair
    [ -f "$R/$1-$2.json" ] && [ -f "$R/$1-$3.json" ] || continue
    echo "### $1: $2 vs $3"
    echo
    python3 tables.py side-by-side "$R/$1-$2.json" "$R/$1-$3.json"
    echo
  done
  if [ -f "$R/full-49152-ours-background.json" ]; then
    echo "### full, ours: INTERACTIVE TTFT idle vs under 64 BATCH streams"
    echo
    python3 tables.py background "$R/full-49152-ours-background.json"
    echo
  fi
  if [ -f "$R/gw-admission.json" ]; then
    echo "### gateway, full worker with 16 slots: 16 and 32 concurrent ~560-token requests"
    echo
    echo '```'; python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); [print(json.dumps({k: l.get(k) for k in ("concurrency","requests","ok","errors","error_kinds","skipped","ttft_ms_p50","ttft_ms_p99","aggregate_tok_s","prompt_tokens_mean")})) for l in r.get("levels",[])]' "$R/gw-admission.json"; echo '```'
    echo
    [ -f "$R/gw-background-14.json" ] && { echo "### gateway: INTERACTIVE idle vs under 14 BATCH streams"; echo; python3 tables.py background "$R/gw-background-14.json"; echo; }
    ls "$R"/overhead-direct-*.json >/dev/null 2>&1 && { echo "### gateway overhead at 16 streams"; echo; python3 tables.py gateway "$R"/overhead-direct-*.json -- "$R"/overhead-gateway-*.json; echo; }
  fi
  [ -f "$R/invariance/invariance.md" ] && { cat "$R/invariance/invariance.md"; echo; }
  if [ -f "$R/kernel.txt" ]; then
    echo "### kernel: bench/mxfp4-kernel-check.c (MXFP4 x Q8_0 vec_dot: native, then the AVX2 CPU backend)"
    echo
    echo '```'; cat "$R/kernel.txt"; echo '```'
    echo
  fi
  if [ -f "$R/probe.txt" ]; then
    echo "### probe: bench/cpu-invariance-probe.cpp (1 vs N rows per decode call, first differing tensor)"
    echo
    echo '```'; cat "$R/probe.txt"; echo '```'
    echo
  fi
  echo "### Memory: adverts vs nvidia-smi (MiB)"
  echo
  cat "$R/memory.md"
  echo
  echo "### VRAM peak (nvidia-smi, MiB, whole GPU)"
  echo
  echo '```'
  cat "$R/vram.tsv"
  echo '```'
  [ -f "$R/skipped.txt" ] && { echo; echo "Not run or cut: $(paste -sd';' "$R/skipped.txt")"; }
} >"$R/summary.md"
stage "done"
touch "$WORK/DONE"
