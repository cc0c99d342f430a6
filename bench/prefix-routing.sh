#!/usr/bin/env bash
# Issue 17: what prefix-aware routing buys multi-turn chats. Runs etcd (loopback, temporary data
# dir), then twice — gateway with --prefix-routing off, then on — three fresh moe-workers and one
# moe-gateway, and drives the same multi-turn chat workload through the gateway with moe-bench
# (--chat-conversations: conversations at once, each turn after the previous one, a shared system
# prompt and a first message of its own per conversation). Reports each turn's TTFT p50 and the
# share of prompt tokens the workers reused from their prefix caches, and writes
# docs/benchmarks/prefix-routing.md. Target: later turns' TTFT p50 with routing <= 0.3x without.
#
# usage: bench/prefix-routing.sh              (env overrides below; PROFILE=debug skips the
#                                              release build and uses target/debug binaries)
#
# On a machine without cargo or network (the GPU host), point it at prebuilt binaries:
#   BIN_DIR=/path/to/bin        moe-worker, moe-gateway, moe-bench there; nothing is built
#   ETCD_BIN=/path/to/etcd      (default: etcd on PATH); ETCDCTL_BIN likewise (default: etcdctl
#                               next to ETCD_BIN, else on PATH)
#   MODEL=/path/to/model.gguf   must exist when BIN_DIR is set (no test model is generated)
#   WORKER_ARGS="--offload full --gpu-layers 99"   extra flags for every moe-worker
#   DOC=/path/report.md OUTDIR=/path/dir           where the report and logs/JSON go
#   GIT_COMMIT=<sha>            recorded instead of `git rev-parse HEAD` (no git checkout there)
#   BINARIES=release            how the prebuilt binaries were built, for the "Every run" row
#   RECORD_ADVERTS=1            also keeps every worker advert the registry saw (diagnosis)
#   WORKER_LOG=warn,...         the workers' RUST_LOG (diagnosis)
#   REPORT_ONLY=1               rewrites $DOC from the results already in $OUTDIR (no run)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

MODEL=${MODEL:-models/smollm2-moe-4x2.gguf}
THREADS=${THREADS:-1}             # per worker: three workers share this machine
CTX=${CTX:-2048}
PARALLEL=${PARALLEL:-4}
CACHE_SEQUENCES=${CACHE_SEQUENCES:-2}
CONVERSATIONS=${CONVERSATIONS:-8}
TURNS=${TURNS:-4}
SYSTEM_TOKENS=${SYSTEM_TOKENS:-64}
FIRST_TOKENS=${FIRST_TOKENS:-200}
MAX_TOKENS=${MAX_TOKENS:-16}
# Longest pause before a later turn (moe-bench --chat-think-ms; each pause uniform in 0..THINK_MS,
# fixed per conversation and turn). 5000, not 0: a chat's next turn comes after its user read the
# answer. With no pause at all the client is a closed loop that (a) sends each turn to whichever
# worker just freed a slot, i.e. the one holding that very conversation, so routing off lands on
# the history by accident, and (b) keeps conversations that share a worker in lock-step, so their
# next turns arrive together and each waits for the others' prefill. THINK_MS=0 still runs.
THINK_MS=${THINK_MS:-5000}
# sequential: off's cluster, then on's (each has the machine to itself; a dedicated host).
# concurrent: both clusters at once, so a shared machine's load, which drifts by 2-3x within
# minutes, weighs on both modes alike (each cluster is still three workers and a gateway).
ORDER=${ORDER:-sequential}
CHAT_SEED=${CHAT_SEED:-17000}     # the same conversations in both modes (moe-bench --chat-seed)
PROFILE=${PROFILE:-release}
DOC=${DOC:-docs/benchmarks/prefix-routing.md}
OUTDIR=${OUTDIR:-target/bench/prefix-routing}
BIN_DIR=${BIN_DIR:-}
ETCD_BIN=${ETCD_BIN:-etcd}
WORKER_ARGS=${WORKER_ARGS:-}
RECORD_ADVERTS=${RECORD_ADVERTS:-0}
WORKER_LOG=${WORKER_LOG:-warn}    # RUST_LOG of the workers (diagnosis: e.g. warn,moe_worker=debug)
read -r -a WORKER_EXTRA <<<"$WORKER_ARGS"

command -v "$ETCD_BIN" >/dev/null || { echo "etcd not found: $ETCD_BIN (Debian package etcd-server; or set ETCD_BIN)" >&2; exit 1; }
if [ -z "${ETCDCTL_BIN:-}" ]; then
  ETCDCTL_BIN=$(dirname "$(command -v "$ETCD_BIN")")/etcdctl
  [ -x "$ETCDCTL_BIN" ] || ETCDCTL_BIN=etcdctl
fi
command -v "$ETCDCTL_BIN" >/dev/null || { echo "etcdctl not found: $ETCDCTL_BIN (set ETCDCTL_BIN)" >&2; exit 1; }
if [ -n "$BIN_DIR" ]; then
  # Prebuilt binaries: no cargo, no test-model generation.
  [ -f "$MODEL" ] || { echo "model not found: $MODEL" >&2; exit 1; }
  BIN=$BIN_DIR
else
  [ -f "$MODEL" ] || python3 scripts/make_test_models.py
  if [ "$PROFILE" = release ] && [ "${REPORT_ONLY:-0}" != 1 ]; then
    echo "== building (release) moe-worker, moe-gateway and moe-bench" >&2
    nice -n 19 cargo build --release -q -p moe-worker -p moe-gateway -p moe-bench
  fi
  BIN=${CARGO_TARGET_DIR:-target}/$PROFILE
fi
for b in moe-worker moe-gateway moe-bench; do
  [ -x "$BIN/$b" ] || [ "${REPORT_ONLY:-0}" = 1 ] || { echo "missing $BIN/$b" >&2; exit 1; }
done
mkdir -p "$OUTDIR" "$(dirname "$DOC")"

BENCH_ARGS=(--chat-conversations "$CONVERSATIONS" --chat-turns "$TURNS" --chat-system-tokens "$SYSTEM_TOKENS"
            --prompt-tokens "$FIRST_TOKENS" --max-tokens "$MAX_TOKENS" --chat-seed "$CHAT_SEED"
            --wait-ready 180s --request-timeout 300s)
[ "$THINK_MS" -gt 0 ] && BENCH_ARGS+=(--chat-think-ms "$THINK_MS")
if [ "${REPORT_ONLY:-0}" != 1 ]; then
DATA=$(mktemp -d)
ETCD_PID= GATEWAY_PIDS=() WATCH_PIDS=() WORKER_PIDS=()
declare -A GATEWAY_PORT_OF METRICS_PORT_OF
stop_cluster() {
  local p
  for p in "${WATCH_PIDS[@]}" "${GATEWAY_PIDS[@]}" "${WORKER_PIDS[@]}"; do stop_pid "$p"; done
  WATCH_PIDS=() GATEWAY_PIDS=() WORKER_PIDS=()
}
cleanup() { stop_cluster; stop_pid "$ETCD_PID"; rm -rf "$DATA"; }
trap cleanup EXIT

ETCD_PORT=$(free_port) PEER_PORT=$(free_port)
ETCD=http://127.0.0.1:$ETCD_PORT
"$ETCD_BIN" --data-dir "$DATA/etcd" --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
     --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
     --initial-cluster "default=http://127.0.0.1:$PEER_PORT" >"$OUTDIR/etcd.log" 2>&1 &
ETCD_PID=$!
wait_port "$ETCD_PORT" 30 "$ETCD_PID"

# start_cluster MODE: three fresh moe-workers (no cache carried over from the other mode) and a
# gateway with --prefix-routing MODE, under a registry prefix of their own; returns when the
# three are registered ready.
start_cluster() {
  local mode=$1 prefix=/moe-bench-$$-$1/ w port n i
  for w in a b c; do
    port=$(free_port)
    RUST_LOG=$WORKER_LOG OMP_WAIT_POLICY=PASSIVE "$BIN/moe-worker" --model "$MODEL" --id "$w" --listen "127.0.0.1:$port" \
      --etcd "$ETCD" --etcd-prefix "$prefix" --ctx-size "$CTX" --parallel "$PARALLEL" \
      --cache-sequences "$CACHE_SEQUENCES" --threads "$THREADS" "${WORKER_EXTRA[@]}" >"$OUTDIR/worker-$mode-$w.log" 2>&1 &
    WORKER_PIDS+=($!)
    wait_port "$port" 120 "$!"
  done
  GATEWAY_PORT_OF[$mode]=$(free_port) METRICS_PORT_OF[$mode]=$(free_port)
  RUST_LOG=warn "$BIN/moe-gateway" --listen "127.0.0.1:${GATEWAY_PORT_OF[$mode]}" --etcd "$ETCD" --etcd-prefix "$prefix" \
    --prefix-routing "$mode" --metrics-listen "127.0.0.1:${METRICS_PORT_OF[$mode]}" >"$OUTDIR/gateway-$mode.log" 2>&1 &
  GATEWAY_PIDS+=($!)
  wait_port "${GATEWAY_PORT_OF[$mode]}" 60 "$!"
  # Workers bind their port before loading the model and register after: wait for all three.
  for ((i = 0; i < 240; i++)); do
    n=$(ETCDCTL_API=3 "$ETCDCTL_BIN" --endpoints "$ETCD" get --prefix "${prefix%/}" --print-value-only \
        | grep -c '"state": *"ready"' || true)
    [ "$n" -ge 3 ] && break
    sleep 0.5
  done
  [ "$n" -ge 3 ] || { echo "$mode: only $n of 3 workers registered ready" >&2; exit 1; }
  if [ "$RECORD_ADVERTS" = 1 ]; then
    ETCDCTL_API=3 "$ETCDCTL_BIN" --endpoints "$ETCD" watch --prefix "${prefix%/}" >"$OUTDIR/adverts-$mode.log" 2>&1 &
    WATCH_PIDS+=($!)
  fi
}

# bench_mode MODE: the chat workload through that mode's gateway; its table to bench-MODE.txt.
bench_mode() {
  "$BIN/moe-bench" --target "grpc://127.0.0.1:${GATEWAY_PORT_OF[$1]}" "${BENCH_ARGS[@]}" --label "prefix-routing-$1" \
    --json "$OUTDIR/$1.json" >"$OUTDIR/bench-$1.txt"
}

# How requests were sized and placed, from the gateway's own counters.
metrics_mode() {
  curl -fsS "http://127.0.0.1:${METRICS_PORT_OF[$1]}/metrics" | grep -E '^moe_(prompt_sizing|prefix_)' \
    >"$OUTDIR/metrics-$1.txt" || true
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date +%s)
if [ "$ORDER" = concurrent ]; then
  start_cluster off
  start_cluster on
  sleep 2   # the gateways list the registry and subscribe to the workers' caches
  echo "== prefix routing off and on at the same time" >&2
  bench_mode off & OFF_BENCH=$!
  bench_mode on & ON_BENCH=$!
  wait "$OFF_BENCH" && wait "$ON_BENCH"
  cat "$OUTDIR/bench-off.txt" "$OUTDIR/bench-on.txt"
  metrics_mode off; metrics_mode on
  stop_cluster
else
  for MODE in off on; do
    start_cluster "$MODE"
    sleep 2   # the gateway lists the registry and subscribes to the workers' caches
    echo "== prefix routing $MODE" >&2
    bench_mode "$MODE"
    cat "$OUTDIR/bench-$MODE.txt"
    metrics_mode "$MODE"
    stop_cluster
  done
fi
ELAPSED=$(( $(date +%s) - STARTED ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
printf 'ELAPSED=%q\nLOAD_START=%q\nLOAD_END=%q\nRUN_DATE=%q\nTHINK_MS=%q\nORDER=%q\n' "$ELAPSED" "$LOAD_START" "$LOAD_END" \
  "$(date -u +%Y-%m-%dT%H:%MZ)" "$THINK_MS" "$ORDER" >"$OUTDIR/run.env"
fi
# shellcheck source=/dev/null
source "$OUTDIR/run.env"

TABLE=$(python3 - "$OUTDIR/off.json" "$OUTDIR/on.json" <<'PY'
import json, sys
off, on = (json.load(open(p)) for p in sys.argv[1:3])
def f(v): return "-" if v is None else f"{v:.2f}"
def g(t, k): return f(t.get(k))
print("| turns | requests (off / on) | TTFT p50 off (s) | TTFT p50 on (s) | on / off | TTFT p90 off / on (s) | worker TTFT p50 off / on (s) | cached/prompt off | cached/prompt on | same worker as previous turn off / on |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for a, b in list(zip(off["by_turn"], on["by_turn"])) + [(off["later_turns"], on["later_turns"])]:
    x, y = a["ttft_p50_seconds"], b["ttft_p50_seconds"]
    ratio = "-" if not x or y is None else f"{y / x:.2f}"
    same = "-" if a["turns"] == "1" else f"{a.get('same_worker', '-')} / {b.get('same_worker', '-')}"
    print(f"| {a['turns']} | {a['requests']} / {b['requests']} | {f(x)} | {f(y)} | {ratio} | {g(a, 'ttft_p90_seconds')} / {g(b, 'ttft_p90_seconds')} | "
          f"{g(a, 'worker_ttft_p50_seconds')} / {g(b, 'worker_ttft_p50_seconds')} | {a['cached_ratio']:.2f} | {b['cached_ratio']:.2f} | {same} |")
errs = off["errors"] + on["errors"]
if errs:
    print()
    print("Errors: " + "; ".join(errs))
PY
)
echo
echo "$TABLE"
# One row per run in the report's "Every run" table: the rows already there are kept.
COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -n "$BIN_DIR" ]; then BINARIES=${BINARIES:-prebuilt}; else BINARIES=$PROFILE; fi
ROW=$(python3 - "$OUTDIR/off.json" "$OUTDIR/on.json" "$RUN_DATE" "$COMMIT" "$BINARIES" "$LOAD_START" "$THINK_MS" "$ORDER" <<'PY'
import json, sys
off, on = (json.load(open(p)) for p in sys.argv[1:3])
date, commit, binaries, load, think, order = sys.argv[3:9]
def p50(t): return t["ttft_p50_seconds"]
def ratio(a, b): return "-" if not p50(a) or p50(b) is None else f"{p50(b) / p50(a):.2f}"
def f(v): return "-" if v is None else f"{v:.2f}"
t2 = (off["by_turn"][1], on["by_turn"][1]) if len(off["by_turn"]) > 1 else None
lo, ln = off["later_turns"], on["later_turns"]
p90 = "-" if not lo["ttft_p90_seconds"] or ln["ttft_p90_seconds"] is None else f"{ln['ttft_p90_seconds'] / lo['ttft_p90_seconds']:.2f}"
print(f"| {date} | `{commit}` | {binaries} | {think} | {load} | {f(p50(lo))} | {f(p50(ln))} | **{ratio(lo, ln)}** | {p90} | "
      f"{ratio(*t2) if t2 else '-'} | {lo['cached_ratio']:.2f} / {ln['cached_ratio']:.2f} | "
      f"{t2[1]['cached_ratio']:.2f} | {order} | {lo.get('same_worker', '-')} / {ln.get('same_worker', '-')} of {lo['requests']} |" if t2 else "")
PY
)
PREVIOUS= NOTES=
if [ -f "$DOC" ]; then
  PREVIOUS=$(sed -n '/^<!-- runs:start -->$/,/^<!-- runs:end -->$/p' "$DOC" | grep '^| 20' || true)
  # The hand-written reading of the runs, kept as it is.
  NOTES=$(sed -n '/^<!-- notes:start -->$/,/^<!-- notes:end -->$/p' "$DOC")
fi
{
  echo "# Prefix-aware routing"
  echo
  echo "Issue 17: with prefix-aware routing (docs/api.md, \"Prefix-aware routing\"), a chat's later turns go to the worker that holds its earlier turns and prefill only the new tokens. Target: TTFT p50 of later turns with routing at most 0.3x without."
  echo "Generated by \`bench/prefix-routing.sh\` (measurement took ${ELAPSED}s); re-running it rewrites this file but keeps the rows of \"Every run\"."
  echo
  echo "## Setup"
  echo
  machine_md
  if [ -n "$BIN_DIR" ]; then echo "- binaries: ${BINARIES:-prebuilt}, from \`$BIN_DIR\`"; else echo "- binaries: $PROFILE profile"; fi
  echo "- etcd on loopback; for each mode three fresh moe-workers (\`$MODEL\`, $THREADS thread each, $CTX KV cells, --parallel $PARALLEL, --cache-sequences $CACHE_SEQUENCES${WORKER_ARGS:+, $WORKER_ARGS}) and one moe-gateway with \`--prefix-routing off\` or \`on\`; everything on 127.0.0.1; $( [ "$ORDER" = concurrent ] && echo "both modes' clusters run at the same time" || echo "off's cluster first, then on's"); load average at start $LOAD_START, at the end ${LOAD_END:-not recorded}"
  echo "- workload: moe-bench chat, $CONVERSATIONS conversations at once x $TURNS turns, a shared system prompt of ~$SYSTEM_TOKENS tokens, a first user message of ~$FIRST_TOKENS tokens of its own per conversation (the same conversations in both modes: --chat-seed $CHAT_SEED), then a short question per turn; $MAX_TOKENS generated tokens per turn, greedy, INTERACTIVE; $( [ "$THINK_MS" -gt 0 ] && echo "a pause of 0-$THINK_MS ms before each later turn (fixed per conversation and turn)" || echo "each later turn sent as soon as the previous one ended")"
  echo "- TTFT is measured by the client; cached/prompt is the sum of \`usage.cached_prompt_tokens\` over the sum of \`usage.prompt_tokens\`"
  echo "- this machine is shared (other builds and tests run at the same time): compare the two modes' ratios, not the absolute times"
  echo
  echo "## Results"
  echo
  echo "$TABLE"
  echo
  echo "\"2+\" is turns 2 to $TURNS together; \"on / off\" is the ratio of the TTFT p50s."
  echo
  echo "## Every run"
  echo
  echo "Each run of this script adds a row (the table above is the last row's detail). Later turns (2+): TTFT p50 off and on, their ratio (target ≤ 0.3), the ratio of their p90s; turn 2's p50 ratio; cached/prompt of later turns off / on; cached/prompt of turn 2 with routing; whether the modes ran one after the other or at the same time (ORDER); how many later turns ran on the worker of the conversation's previous turn."
  echo
  echo "<!-- runs:start -->"
  echo "| date | commit | binaries | think ms | load at start | 2+ p50 off (s) | 2+ p50 on (s) | 2+ on / off | 2+ p90 on / off | turn 2 on / off | 2+ cached off / on | turn 2 cached on | order | 2+ on the previous turn's worker off / on |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
  [ -n "$PREVIOUS" ] && echo "$PREVIOUS"
  # REPORT_ONLY on the same results does not add the row twice.
  grep -qxF -- "$ROW" <<<"$PREVIOUS" || echo "$ROW"
  echo "<!-- runs:end -->"
  echo
  if [ -n "$NOTES" ]; then echo "$NOTES"; echo; fi
  echo "The gateways' counters at the end of each run (\`moe_prompt_sizing_total\`: sized by a worker's tokenizer or by the bytes/3 estimate; \`moe_prefix_*\`: first placements onto a worker holding part of the prompt):"
  echo
  echo '```'
  for MODE in off on; do sed "s/^/$MODE: /" "$OUTDIR/metrics-$MODE.txt"; done
  echo '```'
  echo
  echo "## Commands"
  echo
  echo '```sh'
  if [ -n "$BIN_DIR" ]; then
    echo "BIN_DIR=$BIN_DIR MODEL=$MODEL${WORKER_ARGS:+ WORKER_ARGS=\"$WORKER_ARGS\"} THINK_MS=$THINK_MS ORDER=$ORDER bench/prefix-routing.sh"
  else
    echo "PROFILE=$PROFILE THINK_MS=$THINK_MS ORDER=$ORDER bench/prefix-routing.sh"
  fi
  echo "# per mode:"
  echo "$BIN/moe-worker --model $MODEL --id a --listen 127.0.0.1:PORT --etcd ${ETCD:-http://127.0.0.1:PORT} --etcd-prefix /moe-bench-MODE/ --ctx-size $CTX --parallel $PARALLEL --cache-sequences $CACHE_SEQUENCES --threads $THREADS${WORKER_ARGS:+ $WORKER_ARGS}   # and b, c"
  echo "$BIN/moe-gateway --listen 127.0.0.1:PORT --etcd ${ETCD:-http://127.0.0.1:PORT} --etcd-prefix /moe-bench-MODE/ --prefix-routing MODE"
  echo "$BIN/moe-bench --target grpc://127.0.0.1:PORT ${BENCH_ARGS[*]}$( [ "$THINK_MS" -gt 0 ] && [[ " ${BENCH_ARGS[*]} " != *" --chat-think-ms "* ]] && echo " --chat-think-ms $THINK_MS") --label prefix-routing-MODE --json MODE.json"
  echo '```'
} >"$DOC"
echo "wrote $DOC" >&2
