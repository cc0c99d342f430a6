#!/usr/bin/env bash
# Batch-invariance check on the GPU (issue 14): the same greedy request must give the same text
# alone, among 8 and among 16 identical concurrent requests, and among 8 different prompts sent
# together, on the synthetic gpt-oss-20b (random weights: uniform routing, gibberish text — still a
# valid identity test, since any rounding difference flips some arg-max within 128 tokens).
# Runs each offload profile / KV mode given in MODES, records aggregate speed and VRAM per mode.
#
# Runs ON the device machine from a carry folder holding: moectl.xz, etcd.xz, make_gptoss_like.py,
# ggml-vocab-gpt-2.gguf, gguf-*.whl, and either moe-worker-cuda.xz (static CUDA build, see
# bench/gpu/prepare-carry.sh) or WORKER_BIN pointing at a worker linked against shared llama.cpp
# libraries with LLAMA_LIB_DIR holding a CUDA build of the same llama.cpp source (see
# bench/gpu/build-llama-shared.sh: the CUDA kernels are compiled on the device's 16 cores).
#   bench/gpu/invariance.sh CARRY_DIR OUT_DIR
# env: LAYERS (24), MAX_TOKENS (128), PARALLEL (16), CTX (32768),
#      MODES ("full full:kv-unified cpu-moe"; PROFILE[:FLAG][+nofusion][@avx2], see the loop), WORK (/root/moe-inv), WORKER_BIN, LLAMA_LIB_DIR,
#      AVX2_LIB_DIR (a folder holding an AVX2-only libggml-cpu.so*, see build-llama-shared.sh's AVX2_CPU=1:
#      the @avx2 modes run the worker with it first on LD_LIBRARY_PATH; unset or without the library
#      those modes are skipped)
# The report's "decode mode" column is the worker's own log line (decode_mode=..., batch_invariant=...).
set -uo pipefail
CARRY=$(cd "${1:?carry dir}" && pwd)
OUTD=${2:?out dir}
mkdir -p "$OUTD"; OUTD=$(cd "$OUTD" && pwd)
WORK=${WORK:-/root/moe-inv}
LAYERS=${LAYERS:-24}
MAX_TOKENS=${MAX_TOKENS:-128}
PARALLEL=${PARALLEL:-16}
CTX=${CTX:-32768}
MODES=${MODES:-full full:kv-unified cpu-moe}
REPORT=$OUTD/invariance.md
mkdir -p "$WORK"; cd "$WORK" || exit 1
log() { echo "[$(date +%T)] $*" | tee -a "$OUTD/invariance.log"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 "$2"); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 1; done; return 1; }
unxz_to() { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"; }

CUDA_LIB=$(ls -d /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/local/cuda/targets/x86_64-linux/lib 2>/dev/null | head -1)
export LD_LIBRARY_PATH=${LLAMA_LIB_DIR:+$LLAMA_LIB_DIR:}${CUDA_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export OMP_WAIT_POLICY=PASSIVE
WORKER=${WORKER_BIN:-$WORK/moe-worker-cuda}
[ -n "${WORKER_BIN:-}" ] || { [ -x moe-worker-cuda ] || { unxz_to "$CARRY/moe-worker-cuda.xz" moe-worker-cuda && chmod +x moe-worker-cuda; }; }
for b in moectl etcd; do [ -x "$b" ] || { unxz_to "$CARRY/$b.xz" "$b" && chmod +x "$b"; } || { log "unpacking $b failed"; exit 1; }; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$CARRY"/gguf-*.whl
MODEL=${MODEL:-$WORK/gptoss-$LAYERS.gguf}
if [ ! -f "$MODEL" ]; then
  log "generating the synthetic gpt-oss-20b ($LAYERS layers)"
  PYTHONPATH=$WORK/site python3 "$CARRY/make_gptoss_like.py" "$MODEL" --layers "$LAYERS" \
    --vocab-gguf "$CARRY/ggml-vocab-gpt-2.gguf" >"$OUTD/model.log" 2>&1 || { log "model generation failed"; tail "$OUTD/model.log"; exit 1; }
fi
log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
log "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), nproc $(nproc)"

EP=$(free_port); EPP=$(free_port)
./etcd --name inv --data-dir "$WORK/etcd-data" --listen-client-urls "http://127.0.0.1:$EP" \
  --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$EPP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$EPP" --initial-cluster "inv=http://127.0.0.1:$EPP" >etcd.log 2>&1 &
ETCD_PID=$!
wait_port "$EP" 20 || { log "etcd did not start"; exit 1; }

PROMPTS=(
  "Once upon a time, in a small village by the sea,"
  "The capital of France is"
  "List the planets of the solar system in order:"
  "def fibonacci(n):"
  "In 1492, Columbus sailed"
  "The quick brown fox jumps over the lazy dog. Then"
  "Explain mixture-of-experts models in one paragraph."
  "Recipe for pancakes: ingredients:"
)
gen() { # PORT PROMPT OUTFILE
  ./moectl generate --gateway "127.0.0.1:$1" --max-tokens "$MAX_TOKENS" --temperature 0 "$2" >"$3" 2>"$3.err"
}
{
  echo "# Batch invariance on the GPU"
  echo
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  echo "- host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores"
  echo "- model: synthetic gpt-oss-20b ($LAYERS layers, random weights, gpt-2 vocabulary), greedy, $MAX_TOKENS tokens"
  echo "- worker: --parallel $PARALLEL --ctx-size $CTX"
  echo
  echo "| mode | decode mode | 8 identical = solo | 16 identical = solo | 8 different = their solo | 16-way wall s | 16-way aggregate tok/s | VRAM MiB |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|"
} >"$REPORT"

for mode in $MODES; do
  # MODE is PROFILE[:FLAG][+nofusion][@avx2]: FLAG becomes --FLAG (e.g. full:decode-mode=sequential);
  # +nofusion runs the worker with GGML_CUDA_DISABLE_FUSION=1 (llama.cpp's kernel fusions off);
  # @avx2 runs it with AVX2_LIB_DIR first on LD_LIBRARY_PATH (the AVX2-only CPU backend instead of
  # the native one, e.g. cpu-moe@avx2, full:decode-mode=batched+nofusion@avx2). The suffixes may
  # come in either order; file names use the mode with ':' and '@' as '-'.
  envs=(); m=$mode; fm=${mode//[:@]/-}
  if [[ $m == *@avx2* ]]; then
    m=${m/@avx2/}
    if [ -z "${AVX2_LIB_DIR:-}" ] || ! ls "$AVX2_LIB_DIR"/libggml-cpu.so* >/dev/null 2>&1; then
      log "mode $mode: skipped (AVX2_LIB_DIR '${AVX2_LIB_DIR:-}' has no libggml-cpu.so*)"
      echo "| $mode | not run: no AVX2 CPU backend (AVX2_LIB_DIR) | | | | | | |" >>"$REPORT"
      continue
    fi
    envs+=(LD_LIBRARY_PATH="$AVX2_LIB_DIR:$LD_LIBRARY_PATH")
  fi
  if [[ $m == *+nofusion* ]]; then envs+=(GGML_CUDA_DISABLE_FUSION=1); m=${m/+nofusion/}; fi
  profile=${m%%:*}; extra=()
  [ "$m" != "${m#*:}" ] && extra=(--"${m#*:}")
  WP=$(free_port)
  log "mode $mode: starting the worker${envs[*]:+ (${envs[*]})}"
  env "${envs[@]}" "$WORKER" --model "$MODEL" --offload "$profile" --parallel "$PARALLEL" --ctx-size "$CTX" \
    --listen "127.0.0.1:$WP" --etcd "http://127.0.0.1:$EP" --id "inv-$profile" "${extra[@]}" >"$OUTD/worker-$fm.log" 2>&1 &
  WPID=$!
  ok=0
  for _ in $(seq 1 180); do
    if gen "$WP" "ping" /tmp/ping.txt 2>/dev/null; then ok=1; break; fi
    kill -0 $WPID 2>/dev/null || break
    sleep 1
  done
  [ $ok = 1 ] || { log "mode $mode: worker not ready"; tail -20 "$OUTD/worker-$fm.log"; kill $WPID 2>/dev/null; continue; }
  # The worker's "model loaded" line (ANSI colours stripped): decode_mode="grouped" batch_invariant=true
  wl=$(sed 's/\x1b\[[0-9;]*m//g' "$OUTD/worker-$fm.log")
  dmode="$(grep -o 'decode_mode=[^ ]*' <<<"$wl" | head -1 | cut -d= -f2 | tr -d '"'), batch_invariant=$(grep -o 'batch_invariant=[^ ]*' <<<"$wl" | head -1 | cut -d= -f2)"
  D=$WORK/out-$fm; rm -rf "$D"; mkdir -p "$D"
  for i in "${!PROMPTS[@]}"; do gen "$WP" "${PROMPTS[$i]}" "$D/solo-$i.txt"; done
  for i in $(seq 1 8); do gen "$WP" "${PROMPTS[0]}" "$D/eight-$i.txt" & done; wait_jobs() { for j in $(jobs -p); do [ "$j" = "$WPID" ] || [ "$j" = "$ETCD_PID" ] || wait "$j"; done; }; wait_jobs
  t0=$(date +%s.%N)
  for i in $(seq 1 16); do gen "$WP" "${PROMPTS[0]}" "$D/sixteen-$i.txt" & done; wait_jobs
  t1=$(date +%s.%N)
  for i in "${!PROMPTS[@]}"; do gen "$WP" "${PROMPTS[$i]}" "$D/mixed-$i.txt" & done; wait_jobs
  vram=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F, -v p=$WPID '$1==p {print $2+0}')
  e8=0; for i in $(seq 1 8); do cmp -s "$D/solo-0.txt" "$D/eight-$i.txt" && e8=$((e8+1)); done
  e16=0; for i in $(seq 1 16); do cmp -s "$D/solo-0.txt" "$D/sixteen-$i.txt" && e16=$((e16+1)); done
  em=0; for i in "${!PROMPTS[@]}"; do cmp -s "$D/solo-$i.txt" "$D/mixed-$i.txt" && em=$((em+1)); done
  wall=$(python3 -c "print(f'{$t1-$t0:.2f}')")
  agg=$(python3 -c "print(f'{16*$MAX_TOKENS/($t1-$t0):.0f}')")
  log "mode $mode: $dmode, 8-way $e8/8, 16-way $e16/16, mixed $em/8, 16-way wall ${wall}s, VRAM ${vram:-?} MiB"
  echo "| $mode | $dmode | $e8/8 | $e16/16 | $em/8 | $wall | $agg | ${vram:-?} |" >>"$REPORT"
  grep -h "decode\|tok/s" "$D/solo-0.txt.err" | head -2 >>"$OUTD/invariance.log"
  head -c 300 "$D/solo-0.txt" >"$OUTD/sample-$fm.txt"
  kill -TERM $WPID; wait $WPID 2>/dev/null
done
kill $ETCD_PID 2>/dev/null
cat "$REPORT"
