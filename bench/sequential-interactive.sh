#!/usr/bin/env bash
# INTERACTIVE TTFT idle vs under BATCH load in sequential decode mode (issue 16/18), two worker
# binaries side by side, alternating, direct to the worker (no etcd, no gateway): e.g. the build
# before and after f263cf2 (INTERACTIVE prefill first and whole in its step, steps cut short for
# an INTERACTIVE arrival). Reports each run's line from bench/gpu/stages.py background-check.
#
# usage: bench/sequential-interactive.sh BEFORE_WORKER AFTER_WORKER
# env: MOE_BENCH (moe-bench binary), MODEL, ROUNDS (2), BG (6 BATCH streams), PARALLEL (8),
#      BATCH_SIZE (128: the aligned prefill chunk), PROMPT_TOKENS (384), OUT (/tmp/seq-interactive)
#      and LD_LIBRARY_PATH for workers built with LLAMA_BUILD_SHARED_LIBS=1.
set -u
cd "$(dirname "$0")/.."
BEFORE=${1:?before worker} AFTER=${2:?after worker}
BENCH=${MOE_BENCH:-target/release/moe-bench}
MODEL=${MODEL:-models/smollm2-moe-4x2.gguf}
OUT=${OUT:-/tmp/seq-interactive}; mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
for round in $(seq "${ROUNDS:-2}"); do
  for name in before after; do
    if [ "$name" = before ]; then W=$BEFORE; else W=$AFTER; fi
    port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
    RUST_LOG=warn "$W" --model "$MODEL" --offload full --decode-mode sequential --parallel "${PARALLEL:-8}" \
      --ctx-size 8192 --threads 2 --batch-size "${BATCH_SIZE:-128}" --listen "127.0.0.1:$port" --id "si-$name" \
      >"$OUT/$name-$round-worker.log" 2>&1 &
    WP=$!
    "$BENCH" --target "grpc://127.0.0.1:$port" --concurrency 1 --requests-per-level 8 \
      --prompt-tokens "${PROMPT_TOKENS:-384}" --max-tokens 8 --warmup 1 --wait-ready 60s \
      --background-batch "${BG:-6}" --background-max-tokens 192 --request-timeout 150s --level-timeout 200s \
      --label "$name round $round" --json "$OUT/$name-$round.json" >"$OUT/$name-$round.log" 2>&1
    kill "$WP" 2>/dev/null; wait "$WP" 2>/dev/null
    python3 bench/gpu/stages.py background-check "$OUT/$name-$round.json" "${BG:-6}" "$name r$round"
  done
done
