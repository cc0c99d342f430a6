#!/usr/bin/env bash
# Side-by-side GPU benchmark of moe-worker (CUDA) and upstream llama-server on the lent device
# machine, synthetic gpt-oss-20b, offload profiles full, cpu-moe and n-cpu-moe:12.
#
# The device has no Rust toolchain and no network, so everything comes in a carry folder made
# here by bench/gpu/prepare-carry.sh. The whole job (build llama-server with CUDA ~6 min, make the
# 12 GB model ~1 min, smoke-test our worker, benchmark) outlasts one device command (10 min), so
# `start` launches it detached (setsid: it lives as long as the machine is held) and `wait` follows
# it; a second device call made right after the first (the machine stays warm ~30 s) runs `wait`
# again and brings the results back under $OUT.
#
#   bench/gpu/run-on-device.sh start CARRY_DIR     launch the pipeline, return at once
#   bench/gpu/run-on-device.sh wait SECONDS        follow it until it ends or SECONDS pass; copy results to $OUT
#   bench/gpu/run-on-device.sh pipeline            (internal)
# env: WORK (default /root/moe-gpu), BUDGET_S (pipeline deadline from start, default 1000),
#      LEVELS (1,4,16,64), PROMPT_TOKENS (512), MAX_TOKENS (128), CTX (49152), PARALLEL (64),
#      PROFILES ("full cpu-moe n-cpu-moe:12", in this order of priority), LAYERS (model layers, default 24 = gpt-oss-20b)
set -uo pipefail
WORK=${WORK:-/root/moe-gpu}
R=$WORK/results
LOG=$WORK/pipeline.log

stage() { echo "[$(date +%T) +$(( $(date +%s) - ${T0:-$(date +%s)} ))s] $*"; }

case ${1:-} in
start)
  CARRY=${2:?carry dir}
  mkdir -p "$WORK" "$R"
  cp -f "$0" "$WORK/run.sh"; cp -f bench/build-llama-server.sh bench/tables.py bench/lib.sh "$WORK/"
  cp -f "$CARRY"/* "$WORK/"
  echo "$(date +%s)" >"$WORK/t0"
  # The detached pipeline outlives this command (until the machine is given back).
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
pipeline)
  ;;
*) sed -n 2,20p "$0"; exit 64 ;;
esac
[ "${1:-}" = pipeline ] || exit 0

# ---------------------------------------------------------------- pipeline (detached)
cd "$WORK" || exit 1
source "$WORK/lib.sh"
T0=$(cat "$WORK/t0")
BUDGET_S=${BUDGET_S:-1000}
END_AT=$(( T0 + BUDGET_S ))
LEVELS=${LEVELS:-1,4,16,64}
PROMPT_TOKENS=${PROMPT_TOKENS:-512}
MAX_TOKENS=${MAX_TOKENS:-128}
CTX=${CTX:-49152}
PARALLEL=${PARALLEL:-64}
THREADS=${THREADS:-$(nproc)}
PROFILES=${PROFILES:-full cpu-moe n-cpu-moe:12}
LAYERS=${LAYERS:-24}
MODEL=$WORK/gptoss-20b-synthetic.gguf
fail() { stage "FAILED: $*"; echo "$*" >"$WORK/FAILED"; exit 1; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
CUDA_LIB=$(ls -d /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/local/cuda/targets/x86_64-linux/lib 2>/dev/null | head -1)
export LD_LIBRARY_PATH=${CUDA_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:$WORK/fallback-lib
command -v nvcc >/dev/null || export PATH=$(dirname "$(ls /usr/local/cuda*/bin/nvcc | head -1)"):$PATH

stage "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
stage "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), nproc $(nproc)"
mkdir -p fallback-lib && [ -f libgomp.so.1 ] && mv libgomp.so.1 fallback-lib/
python3 -c 'import lzma,shutil; shutil.copyfileobj(lzma.open("moe-worker-cuda.xz"), open("moe-worker","wb"))' || fail "unpacking the worker"
chmod +x moe-worker moe-bench
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" gguf-*.whl || fail "installing gguf"

stage "building llama-server (CUDA, sm_90) in the background"
( JOBS=$(nproc) CMAKE_CUDA_ARCHITECTURES=90 bash build-llama-server.sh --cuda --cache "$WORK" --src-tarball llama.cpp-src.tar.gz \
    >build-llama-server.log 2>&1; echo $? >build.rc ) &
if [ ! -f "$MODEL" ]; then
  stage "generating the synthetic gpt-oss-20b ($LAYERS layers)"
  PYTHONPATH=$WORK/site python3 make_gptoss_like.py "$MODEL.tmp" --vocab-gguf ggml-vocab-gpt-2.gguf --layers "$LAYERS" \
    >make-model.log 2>&1 || { tail -5 make-model.log; fail "making the model"; }
  mv "$MODEL.tmp" "$MODEL"
fi
stage "model: $(du -h "$MODEL" | cut -f1)"

VRAM_PID=
vram_start() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$1" 2>/dev/null & VRAM_PID=$!; }
vram_stop() { kill "$VRAM_PID" 2>/dev/null; wait "$VRAM_PID" 2>/dev/null; VRAM_PID=; sort -n "$1" | tail -1; }
PID=
trap 'stop_pid "$PID"; [ -n "$VRAM_PID" ] && kill "$VRAM_PID"' EXIT

worker_cmd() { # PROFILE PORT PARALLEL CTX
  echo ./moe-worker --model "$MODEL" --offload "$1" --listen "127.0.0.1:$2" --ctx-size "$4" --parallel "$3" \
       --threads "$THREADS" --batch-size 2048 --max-queue 1024
}
upstream_cmd() { # PROFILE PORT PARALLEL CTX
  local extra=()
  case $1 in
    full) ;;
    cpu-moe) extra=(--cpu-moe -lm none) ;;                 # our worker loads host experts without mmap too
    n-cpu-moe:*) extra=(--n-cpu-moe "${1#n-cpu-moe:}" -lm none) ;;
  esac
  echo "$WORK/llama-server-cuda/bin/llama-server" -m "$MODEL" --host 127.0.0.1 --port "$2" -c "$4" -np "$3" \
       --cont-batching --kv-unified -t "$THREADS" -tb "$THREADS" -b 2048 -ub 512 -ngl 999 -fit off --no-webui "${extra[@]}"
}

stage "smoke test of our CUDA worker (full offload)"
PORT=$(free_port)
$(worker_cmd full "$PORT" 4 8192) >smoke-worker.log 2>&1 &
PID=$!
./moe-bench --target "grpc://127.0.0.1:$PORT" --concurrency 1 --requests-per-level 2 --prompt-tokens 64 --max-tokens 32 \
  --warmup 1 --wait-ready 180s --label smoke --json "$R/smoke.json" >smoke-bench.log 2>&1
RC=$?
cat smoke-bench.log
grep -m3 -i "cuda\|offload\|error" smoke-worker.log
stop_pid "$PID"; PID=
[ "$RC" = 0 ] || { tail -20 smoke-worker.log; fail "smoke test of the CUDA worker (moe-bench rc $RC)"; }

stage "waiting for the llama-server build"
while [ ! -f build.rc ]; do sleep 2; done
[ "$(cat build.rc)" = 0 ] || { tail -20 build-llama-server.log; fail "building llama-server"; }
"$WORK/llama-server-cuda/bin/llama-server" --version >"$R/llama-server-version.txt" 2>&1
stage "llama-server built: $(grep -m1 version "$R/llama-server-version.txt")"

# Rough seconds one server needs for a profile (load + all levels), from GPU.md's reference numbers.
estimate() { # PROFILE LEVELS
  local big=0; [[ ",$2," == *",64,"* ]] && big=1
  case $1 in
    full) echo $(( 40 + big * 30 )) ;;
    n-cpu-moe:*) echo $(( 70 + big * 90 )) ;;
    *) echo $(( 80 + big * 90 )) ;;
  esac
}

run_server() { # NAME PROFILE LEVELS
  local name=$1 profile=$2 levels=$3 port cmd target tag
  port=$(free_port); tag=${profile//:/-}-$name
  if [ "$name" = ours ]; then
    cmd=$(worker_cmd "$profile" "$port" "$PARALLEL" "$CTX"); target=grpc://127.0.0.1:$port
  else
    cmd=$(upstream_cmd "$profile" "$port" "$PARALLEL" "$CTX"); target=llama-server://127.0.0.1:$port
  fi
  echo "$cmd" >>"$R/commands.txt"
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits)
  vram_start "$WORK/vram-$tag.txt"
  local t=$(date +%s)
  RUST_LOG=warn $cmd >"$WORK/server-$tag.log" 2>&1 &
  PID=$!
  local bench=(./moe-bench --target "$target" --concurrency "$levels" --requests-per-level 1 --prompt-tokens "$PROMPT_TOKENS"
               --max-tokens "$MAX_TOKENS" --warmup 1 --wait-ready 240s --request-timeout 200s --level-timeout 200s
               --label "$name $profile" --json "$R/$tag.json")
  echo "${bench[*]}" >>"$R/commands.txt"
  "${bench[@]}" 2>&1 | tee "$WORK/bench-$tag.log"
  stop_pid "$PID"; PID=
  local peak; peak=$(vram_stop "$WORK/vram-$tag.txt")
  echo -e "$profile\t$name\t$base\t$peak\t$(( $(date +%s) - t ))" >>"$R/vram.tsv"
  stage "$name $profile: VRAM peak ${peak} MiB (baseline $base), $(( $(date +%s) - t ))s"
}

echo -e "profile\tserver\tvram_base_mib\tvram_peak_mib\tseconds" >"$R/vram.tsv"
for profile in $PROFILES; do
  left=$(( END_AT - $(date +%s) ))
  levels=$LEVELS
  if [ "$left" -lt $(( 2 * $(estimate "$profile" "$levels") )) ]; then
    levels=$(echo "$LEVELS" | tr , '\n' | awk '$1 < 64' | paste -sd,)
    if [ "$left" -lt $(( 2 * $(estimate "$profile" "$levels") )) ]; then
      stage "skipping $profile: ${left}s left"; echo "$profile: not run (time)" >>"$R/skipped.txt"; continue
    fi
    echo "$profile: levels $levels only (time)" >>"$R/skipped.txt"
  fi
  stage "profile $profile, levels $levels"
  run_server ours "$profile" "$levels"
  run_server upstream "$profile" "$levels"
done

{
  echo "Device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader); CPU:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), nproc $(nproc)"
  echo "llama-server: $(grep -m2 -i 'version\|built' "$R/llama-server-version.txt" | paste -sd' ')"
  echo
  for profile in $PROFILES; do
    tag=${profile//:/-}
    [ -f "$R/$tag-ours.json" ] && [ -f "$R/$tag-upstream.json" ] || continue
    echo "### $profile"
    echo
    python3 tables.py side-by-side "$R/$tag-ours.json" "$R/$tag-upstream.json"
    echo
  done
  echo "### VRAM peak (nvidia-smi, MiB, whole GPU)"
  echo
  echo '```'
  cat "$R/vram.tsv"
  echo '```'
  [ -f "$R/skipped.txt" ] && { echo; echo "Not run or cut: $(paste -sd';' "$R/skipped.txt")"; }
} >"$R/summary.md"
stage "done"
touch "$WORK/DONE"
