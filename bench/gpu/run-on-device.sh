#!/usr/bin/env bash
# Side-by-side GPU benchmark of moe-worker (CUDA) and upstream llama-server on the lent device
# machine, synthetic gpt-oss-20b: VRAM peaks, speed at 1/4/16/64 streams per offload profile,
# host-expert decode against the measured host read bandwidth (AVX-512 vs AVX2 CPU code, thread
# counts), INTERACTIVE TTFT under BATCH load, N-on-N admission and the gateway's overhead, and the
# batch-invariance check (bench/gpu/invariance.sh). Issues 14, 16 and 18; results in
# docs/benchmarks/gpu.md.
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
#   bench/gpu/run-on-device.sh pipeline            (internal)
# env: WORK (/root/moe-gpu), BUDGET_S (deadline from start, 1500), RPL (requests per level, 16),
#      STAGES ("invariance gateway cpu-moe full n-cpu-moe threads"), OURS_FLAGS (extra worker
#      flags for every run), BATCHED_FLAG (the worker flag for batched decode, "--decode-mode batched";
#      empty: skip the batched rows), INV_MODES (invariance.sh MODES, "full cpu-moe"), LAYERS (24)
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
    bench/gpu/build-llama-shared.sh bench/gpu/invariance.sh "$WORK/"
  cp -f "$CARRY"/* "$WORK/"
  echo "$(date +%s)" >"$WORK/t0"
  setsid nohup bash "$WORK/run.sh" pipeline >"$LOG" 2>&1 </dev/null &
  echo "pipeline started (pid $!), log $LOG"
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
*) sed -n 2,24p "$0"; exit 64 ;;
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
STAGES=${STAGES:-invariance gateway cpu-moe full n-cpu-moe threads}
OURS_FLAGS=${OURS_FLAGS:-}
BATCHED_FLAG=${BATCHED_FLAG---decode-mode batched}
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

stage "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
stage "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), nproc $NPROC, flags: $(grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | paste -sd' ')"
for b in moe-worker moe-gateway moectl moe-bench etcd; do
  [ -f "$b.xz" ] || fail "carry lacks $b.xz"
  unxz_to "$b.xz" "$b" && chmod +x "$b" || fail "unpacking $b"
done

# 1. Host read bandwidth, first, while nothing else runs.
stage "host memory read bandwidth"
gcc -O3 -march=native -fopenmp membw.c -o membw && ./membw "${MEMBW_GIB:-8}" 5 | tee "$R/membw.txt"

# 2. Both llama.cpp builds, on separate halves of the cores, while the model is generated.
stage "building ours (shared libs, CUDA, native CPU + an AVX2 CPU backend) on cores 0-$(( HALF - 1 )) and upstream llama-server (CUDA, native CPU) on cores $HALF-$(( NPROC - 1 ))"
# (A dry run elsewhere can pass PREBUILT_LIBS / PREBUILT_AVX2 / SERVER instead.)
if [ -n "${PREBUILT_LIBS:-}" ]; then echo 0 >ours.rc; else
( JOBS=$HALF AVX2_CPU=1 taskset -c "0-$(( HALF - 1 ))" bash build-llama-shared.sh ours-llama.cpp-src.tar.xz "$WORK/ll" \
    >build-ours.log 2>&1; echo $? >ours.rc ) &
fi
if [ -n "${SERVER:-}" ]; then echo 0 >upstream.rc; else
( JOBS=$HALF CMAKE_CUDA_ARCHITECTURES=90 taskset -c "$HALF-$(( NPROC - 1 ))" bash build-llama-server.sh --cuda --cache "$WORK" \
    --src-tarball upstream-llama.cpp-src.tar.xz >build-upstream.log 2>&1; echo $? >upstream.rc ) &
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" gguf-*.whl || fail "installing gguf"
if [ ! -f "$MODEL" ]; then
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
mkdir -p "$WORK/cpu-avx2" && cp -a "${PREBUILT_AVX2:-$WORK/ll/build-avx2/bin}"/libggml-cpu.so* "$WORK/cpu-avx2/" || fail "no AVX2 CPU backend"
export LD_LIBRARY_PATH=$LIBS:$CUDA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
stage "ours built: $(ldd ./moe-worker | grep -E 'libllama|libggml' | awk '{print $3}' | paste -sd' ')"

VRAM_PID=
vram_start() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$1" 2>/dev/null & VRAM_PID=$!; }
vram_stop() { kill "$VRAM_PID" 2>/dev/null; wait "$VRAM_PID" 2>/dev/null; VRAM_PID=; sort -n "$1" | tail -1; }
PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do stop_pid "$p"; done; PIDS=(); }
trap 'cleanup; [ -n "$VRAM_PID" ] && kill "$VRAM_PID"; kill "$ETCD_PID" 2>/dev/null' EXIT

worker_cmd() { # PROFILE PORT PARALLEL CTX ID [extra...]   (env WTHREADS: llama threads, default all cores)
  local p=$1 port=$2 par=$3 ctx=$4 id=$5; shift 5
  echo ./moe-worker --model "$MODEL" --offload "$p" --listen "127.0.0.1:$port" --ctx-size "$ctx" --parallel "$par" \
       --threads "${WTHREADS:-$NPROC}" --batch-size 2048 --max-queue 1024 --etcd "$ETCD" --id "$id" --lease-ttl 5s $OURS_FLAGS "$@"
}
upstream_cmd() { # PROFILE PORT PARALLEL CTX
  local extra=()
  case $1 in
    full) ;;
    cpu-moe) extra=(--cpu-moe -lm none) ;;                 # our worker loads host experts without mmap too
    n-cpu-moe:*) extra=(--n-cpu-moe "${1#n-cpu-moe:}" -lm none) ;;
  esac
  echo "$SERVER" -m "$MODEL" --host 127.0.0.1 --port "$2" -c "$4" -np "$3" \
       --cont-batching --kv-unified -t "$NPROC" -tb "$NPROC" -b 2048 -ub 512 -ngl 999 -fit off --no-webui "${extra[@]}"
}
memory_snapshot() { # LABEL
  sleep 6   # adverts refresh device memory every 5 s
  ./moectl workers --etcd "$ETCD" --json >"$R/advert-$1.jsonl" 2>>"$WORK/moectl.log"
  nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits >"$R/smi-$1.txt"
  python3 memory.py row "$1" "$R/smi-$1.txt" <"$R/advert-$1.jsonl" >>"$R/memory.md" || echo "| $1 | (no advert) |" >>"$R/memory.md"
}

# run_server NAME PROFILE CTX PARALLEL LEVELS MAX_TOKENS [worker flags...]
#   NAME: ours, ours-batched, ours-avx2, ours-tN (threads N) or upstream. Writes $R/TAG.json and a
#   VRAM peak row; ours also an advert/nvidia-smi memory row.
run_server() {
  local name=$1 profile=$2 ctx=$3 par=$4 levels=$5 maxt=$6; shift 6
  local port cmd target tag pid base t peak
  port=$(free_port); tag=${profile//:/-}-$ctx-$name
  if [ "$name" = upstream ]; then
    cmd=$(upstream_cmd "$profile" "$port" "$par" "$ctx"); target=llama-server://127.0.0.1:$port
  else
    cmd=$(worker_cmd "$profile" "$port" "$par" "$ctx" "bench-$tag" "$@"); target=grpc://127.0.0.1:$port
  fi
  echo "$cmd" >>"$R/commands.txt"
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)
  vram_start "$WORK/vram-$tag.txt"
  t=$(date +%s)
  if [ "$name" = ours-avx2 ]; then
    LD_LIBRARY_PATH=$WORK/cpu-avx2:$LD_LIBRARY_PATH RUST_LOG=warn,moe_worker::engine=info $cmd >"$WORK/server-$tag.log" 2>&1 &
  else
    RUST_LOG=warn,moe_worker::engine=info $cmd >"$WORK/server-$tag.log" 2>&1 &
  fi
  pid=$!; PIDS=("$pid")
  local bench=(./moe-bench --target "$target" --concurrency "$levels" --requests-per-level "$RPL" --prompt-tokens "$PROMPT_TOKENS"
               --max-tokens "$maxt" --warmup 1 --wait-ready 240s --request-timeout 200s --level-timeout 200s
               --label "$name $profile" --json "$R/$tag.json")
  echo "${bench[*]}" >>"$R/commands.txt"
  "${bench[@]}" >"$WORK/bench-$tag.log" 2>&1 || { stage "$name $profile: moe-bench failed"; tail -5 "$WORK/bench-$tag.log"; }
  tail -4 "$WORK/bench-$tag.log"
  if [ "$name" = upstream ]; then
    grep -i "n_cpu_moe\|model buffer size\|KV buffer size\|compute buffer size\|CPU_REPACK\|system_info" "$WORK/server-$tag.log" | head -40 >"$R/upstream-$tag-memory.txt"
  else
    memory_snapshot "$profile $ctx $name"
    grep -m3 -i "decode mode\|decode_mode\|sequential" "$WORK/server-$tag.log" >"$R/$tag-mode.txt"
  fi
  if [ -n "${BACKGROUND:-}" ]; then
    stage "$name $profile: $BACKGROUND BATCH streams vs INTERACTIVE requests"
    local bg=(./moe-bench --target "$target" --concurrency 1 --requests-per-level 8 --prompt-tokens "$PROMPT_TOKENS"
              --max-tokens 32 --warmup 1 --background-batch "$BACKGROUND" --background-max-tokens 192 --request-timeout 200s
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

# Ours-only stages while upstream still builds on the other half of the cores.
if [[ " $STAGES " == *" invariance "* ]] && has_time 300 invariance; then
  stage "batch invariance (modes: ${INV_MODES:-full cpu-moe})"
  MAX_TOKENS=${INV_MAX_TOKENS:-64} MODES=${INV_MODES:-full cpu-moe} MODEL=$MODEL WORK=$WORK WORKER_BIN=$WORK/moe-worker LLAMA_LIB_DIR=$LIBS LAYERS=$LAYERS \
    bash invariance.sh "$WORK" "$R/invariance" >invariance-run.log 2>&1
  tail -8 "$R/invariance/invariance.md" 2>/dev/null || tail -20 invariance-run.log
fi
if [[ " $STAGES " == *" gateway "* ]] && has_time 240 gateway; then
  stage "gateway: 16/32 on 16 slots, interactive under 14 batch, overhead at 16 streams"
  run_gateway
fi

stage "waiting for llama-server"
while [ ! -f upstream.rc ]; do sleep 2; done
[ "$(cat upstream.rc)" = 0 ] || { tail -20 build-upstream.log; fail "building llama-server"; }
SERVER=${SERVER:-$WORK/llama-server-cuda/bin/llama-server}
"$SERVER" --version >"$R/llama-server-version.txt" 2>&1 || true
stage "llama-server: $(grep -m1 version "$R/llama-server-version.txt")"

if [[ " $STAGES " == *" cpu-moe "* ]] && has_time 330 cpu-moe; then
  stage "cpu-moe at 16384 cells / 16 sequences: ours, ours with AVX2 CPU code, upstream"
  run_server ours cpu-moe 16384 16 1,4,16 64
  RPL=8 run_server ours-avx2 cpu-moe 16384 16 1 64
  run_server upstream cpu-moe 16384 16 1,4,16 64
fi
if [[ " $STAGES " == *" full "* ]] && has_time 300 full; then
  stage "full at 49152 cells / 64 sequences"
  BACKGROUND=64 run_server ours full 49152 64 1,4,16,64 128
  run_server upstream full 49152 64 1,4,16,64 128
fi
if [[ " $STAGES " == *" n-cpu-moe "* ]] && has_time 240 n-cpu-moe; then
  stage "n-cpu-moe:12 at 64 streams"
  RPL=64 run_server ours n-cpu-moe:12 49152 64 64 64
  RPL=64 run_server upstream n-cpu-moe:12 49152 64 64 64
fi
if [[ " $STAGES " == *" full "* ]] && [ -n "$BATCHED_FLAG" ] && has_time 120 full-batched; then
  stage "full, ours with batched decode (not batch-invariant on the GPU), for the invariance trade-off"
  run_server ours-batched full 49152 64 16,64 128 $BATCHED_FLAG
fi
if [[ " $STAGES " == *" threads "* ]]; then
  for n in $(( NPROC / 4 )) $HALF; do
    [ "$n" -ge 1 ] || continue
    has_time 80 "threads $n" || break
    RPL=8 WTHREADS=$n run_server "ours-t$n" cpu-moe 16384 16 1 64
  done
fi

{
  echo "Device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), nproc $NPROC"
  echo "Host read bandwidth: $(cat "$R/membw.txt" 2>/dev/null)"
  echo "llama-server: $(grep -m2 -i 'version\|built' "$R/llama-server-version.txt" | paste -sd' ')"
  echo
  for pair in "cpu-moe-16384 ours upstream" "cpu-moe-16384 ours-avx2 ours" "cpu-moe-16384 ours-t$(( NPROC / 4 )) ours" \
              "cpu-moe-16384 ours-t$HALF ours" "full-49152 ours upstream" "full-49152 ours-batched upstream" \
              "full-49152 ours ours-batched" "n-cpu-moe-12-49152 ours upstream"; do
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
