#!/usr/bin/env bash
# Device-side driver for the GPU batch-invariance check (issue 14): builds the CUDA llama.cpp
# shared libraries on the device while the synthetic model is generated, then runs
# bench/gpu/invariance.sh with a worker built here against shared llama.cpp libraries.
# Detached, so it can outlive one device command; follow it with `wait`.
#
#   bench/gpu/invariance-pipeline.sh start CARRY_DIR   (carry: llama.cpp-src.tar.xz, moectl.xz, etcd.xz,
#                                                       make_gptoss_like.py, ggml-vocab-gpt-2.gguf,
#                                                       gguf-*.whl; moe-worker.xz [LLAMA_BUILD_SHARED_LIBS=1
#                                                       release build] now or later through `worker`)
#   bench/gpu/invariance-pipeline.sh worker FILE.xz    (hands the worker binary to a running pipeline)
#   bench/gpu/invariance-pipeline.sh wait SECONDS      (copies results to $OUT when set)
set -uo pipefail
W=${WORK:-/root/inv}
case ${1:-} in
start)
  CARRY=$(cd "${2:?carry dir}" && pwd)
  mkdir -p "$W/out"
  cp -r "$CARRY" "$W/carry"; cp bench/gpu/invariance.sh bench/gpu/build-llama-shared.sh "$0" "$W/"
  setsid nohup bash "$W/$(basename "$0")" pipeline >"$W/out/pipeline.log" 2>&1 </dev/null &
  echo "started"
  ;;
worker)
  cp "${2:?worker.xz}" "$W/carry/moe-worker.xz.part" && mv "$W/carry/moe-worker.xz.part" "$W/carry/moe-worker.xz"
  echo "worker handed over"
  ;;
wait)
  END=$(( $(date +%s) + ${2:?seconds} ))
  while [ ! -f "$W/DONE" ] && [ "$(date +%s)" -lt "$END" ]; do sleep 3; done
  cat "$W/out/pipeline.log"
  [ -n "${OUT:-}" ] && { cp "$W"/out/*.md "$W"/out/*.log "$OUT/" 2>/dev/null; tar -czf "$OUT/inv-out.tar.gz" -C "$W" out 2>/dev/null; }
  [ -f "$W/DONE" ] || { echo "still running"; exit 3; }
  ;;
pipeline)
  cd "$W" || exit 1
  C=$W/carry
  echo "[$(date +%T)] building llama.cpp (CUDA, shared) and generating the model in parallel"
  ( bash "$W/build-llama-shared.sh" "$C/llama.cpp-src.tar.xz" "$W/ll" >"$W/out/build-llama.log" 2>&1; echo $? >"$W/build.rc" ) &
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" "$C"/gguf-*.whl
  PYTHONPATH=$W/site python3 "$C/make_gptoss_like.py" "$W/gptoss-${LAYERS:-24}.gguf" --layers "${LAYERS:-24}" \
    --vocab-gguf "$C/ggml-vocab-gpt-2.gguf" >"$W/out/model.log" 2>&1
  echo "[$(date +%T)] model: $(ls -la "$W/gptoss-${LAYERS:-24}.gguf" 2>&1)"
  wait
  echo "[$(date +%T)] llama.cpp build rc=$(cat "$W/build.rc")"; tail -3 "$W/out/build-llama.log"
  for _ in $(seq 1 300); do [ -f "$C/moe-worker.xz" ] && break; sleep 2; done
  python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$C/moe-worker.xz" "$W/moe-worker" && chmod +x "$W/moe-worker"
  if [ "$(cat "$W/build.rc")" = 0 ] && [ -x "$W/moe-worker" ]; then
    ldd "$W/moe-worker" | grep -E "llama|ggml" | sed "s|^|  |"
    WORK=$W WORKER_BIN=$W/moe-worker LLAMA_LIB_DIR=$W/ll/build/bin bash "$W/invariance.sh" "$C" "$W/out"
  fi
  touch "$W/DONE"
  ;;
*) sed -n 2,13p "$0"; exit 64 ;;
esac
