#!/usr/bin/env bash
# Builds moe-sim in release mode, runs the default scheduler simulation and a few what-if
# scenarios, and writes docs/benchmarks/scheduler-simulation.md with the machine, the commit,
# the exact commands and the tables. Raw output (text, JSON, markdown) goes to target/sim/.
#   bench/simulate.sh              default scenario + what-ifs (a few minutes on 2 cores)
#   SIM_ONLY_DEFAULT=1 bench/simulate.sh     the default scenario only (under a minute)
#   SIM_ONLY_PREFIX=1 bench/simulate.sh      the prefix-affinity scenarios only (issue 17)
# Extra arguments are passed to every moe-sim run (e.g. --seed 2).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=docs/benchmarks/scheduler-simulation.md
RAW=${CARGO_TARGET_DIR:-target}/sim
SIM=${CARGO_TARGET_DIR:-target}/release/moe-sim
mkdir -p "$RAW" "$(dirname "$OUT")"

cargo build --release -p moe-sim --bin moe-sim

# title|moe-sim arguments; the default scenario first.
SCENARIOS=()
[ -z "${SIM_ONLY_PREFIX:-}" ] && SCENARIOS+=("Default scenario|")
PREFIX="--conversations 5000 --policies ours-scan,ours,prefix,hits,round-robin"
SCENARIOS+=(
  "Prefix caches, 5000 conversations, one gateway (issue 17)|$PREFIX --gateways 1"
  "Prefix caches, 5000 conversations, four gateways (issue 17)|$PREFIX --gateways 4"
)
if [ -z "${SIM_ONLY_DEFAULT:-}" ] && [ -z "${SIM_ONLY_PREFIX:-}" ]; then
  SCENARIOS+=(
    "What-if: workers advertise only admitted reservations (the advert before 58a3ad8)|--advert-free-kv admitted"
    "Workers admit interactive before batch (moe-worker's own order)|--worker-queue interactive-first"
    "Four gateways, each seeing only its own reservations|--gateways 4"
    "Lighter load: 300 req/s|--rate 300"
    "Near saturation: 1000 req/s|--rate 1000"
  )
fi

results=""
i=0
for entry in "${SCENARIOS[@]}"; do
  title=${entry%%|*}
  args=${entry#*|}
  i=$((i + 1))
  cmd="$SIM${args:+ $args}${*:+ $*} --json $RAW/scenario-$i.json --markdown $RAW/scenario-$i.md"
  echo "== $title: $cmd" >&2
  start=$(date +%s.%N)
  $cmd > "$RAW/scenario-$i.txt"
  wall=$(echo "$(date +%s.%N) - $start" | bc)
  cat "$RAW/scenario-$i.txt"
  results+="### $title"$'\n\n'
  results+="\`$cmd\` — $(head -1 "$RAW/scenario-$i.txt"); $(printf '%.0f' "$wall") s wall for all policies (one thread each)."$'\n\n'
  results+="$(cat "$RAW/scenario-$i.md")"$'\n\n'
done

commit=$(git rev-parse --short HEAD)
dirty=""
if ! git diff --quiet HEAD -- crates/gateway || [ -n "$(git ls-files --others --exclude-standard crates/gateway)" ]; then
  dirty=" (plus uncommitted changes under crates/gateway)"
fi

cat > "$OUT" <<DOC
# Scheduler simulation

\`bench/simulate.sh\` on $(date -u +%Y-%m-%d), commit \`$commit\`$dirty.
Machine: \`$(uname -a)\`, $(nproc) cores.

\`moe-sim\` (crates/sim: binary in src/main.rs, model in src/) drives the real
placement policy, \`scheduler::rank\` with the default \`Policy\`, against modelled workers in
virtual time, next to round-robin and least-loaded, on one request trace, worker set and churn
(deterministic for a seed). Policies: *ours* is the live default (first placements sample k = 4
workers of the preferred pool, full scan as fallback), *ours-scan* the full scan and sort of every
worker (the policy before issue 17), *prefix* the default plus rendezvous prefix affinity keyed by
conversation, bounded by load (\`scheduler::affinity::rank_with_prefix\`; simulation only, never
on the live path), *hits* the live prefix-aware policy (\`--prefix-routing on\`:
\`scheduler::affinity::rank_with_hits\` with the cached tokens of every worker holding the
conversation, as the gateway's prefix index reports them).

## The model

- **Workers**: 1000, 30 % \`full\` and 70 % \`cpu-moe\`. Continuous batching like moe-worker's
  batcher: a request is admitted between steps when a slot and its whole KV reservation
  (prompt + max_tokens) are free, otherwise it waits in the worker's FIFO queue (head of line);
  a step decodes one token of every running sequence plus prompt chunks up to 512 tokens and
  lasts \`base + per_seq × decoding + prefill_tokens / prefill_tps\`.

  | profile | KV tokens | slots | base | per sequence | prefill |
  |---|---:|---:|---:|---:|---:|
  | full | 16384 | 16 | 2.8 ms | 1.2 ms | 6000 tok/s |
  | cpu-moe | 32768 | 64 | 35.5 ms | 2.5 ms | 1100 tok/s |

  Calibrated on the H100 measurements of synthetic gpt-oss-20b with upstream llama.cpp
  (/work/shared/GPU.md): full GPU one stream 252–267 tok/s (model 250) and 78–91 ms TTFT for a
  512-token prompt (model 88 ms); under llama-server concurrency 433 tok/s at 16 streams and
  534 at 64 (model ≈ 470 and ≈ 510 with 1.2 ms per sequence; 0.25 ms would give ≈ 1000 at 64).
  \`--cpu-moe\` with pinned memory: 26.3 tok/s one stream (model 26.3), 497 ms TTFT at 512 tokens
  (model 500), 140 tok/s and 14 s TTFT p50 at 64 streams (model ≈ 2.5 ms per sequence). The
  16-stream cpu-moe point (45 tok/s) is not reproduced (model ≈ 110). Override with
  \`--full-model\` / \`--cpu-moe-model\` (e.g. \`per_seq_ms=0.25\`).
- **Adverts**: each worker's advert (free KV = capacity − reservations of admitted and queued requests, active, queued,
  measured speeds) is refreshed every 250 ms at its own phase, as the registrar's
  \`min_update_interval\` does; the policies see nothing newer. One gateway by default, holding
  the reservations of its placements (\`Reservations\`), newer ones subtracted from headroom.
- **Placement** as the proxy does it: up to 3 workers per request (the fallback list only on a
  retry); a worker refuses only when its queue (256) is full. When the gateway finds no worker
  (ours: \`NoHeadroom\` or no candidate in the allowed pools), the client backs off 1 s and sends
  the request again, up to 30 times; TTFT counts from its first arrival.
- **Requests**: Poisson at 500 req/s for 90 s of virtual time; the first 30 s are warm-up
  (simulated, not counted: cpu-moe batch streams last ~20–30 s, so the cluster needs that long to
  fill). 30 % interactive (prompt 200–1000 tokens, 128 generated), 70 % batch (500–2000, 256).
  Every request generates all its max_tokens, and prompt sizes are known exactly.
- **Churn**: 1 % of workers leave per minute (as many join, advertising within 250 ms); a leaving
  worker's running and queued requests are re-placed at once with the tokens generated so far
  added to the prompt (the proxy's migration).
- **Prefix caches** (issue 17 scenarios): with \`--conversations N\` every request continues one of
  N conversations (uniformly); each worker keeps the last 64 conversations it served (LRU), and a
  request placed on a worker holding its conversation skips 80 % of its prompt in prefill (the
  cells still count in KV). *prefix hits %* is the share of counted requests whose last placement
  was such a hit; *load imbalance* is the busiest worker's time-averaged admitted sequences over
  its pool's mean.
- **Columns**: *headroom violations* are placements onto a worker whose KV, after everything
  already queued there is admitted, cannot hold prompt + max_tokens (the request waits for memory
  at the worker); *spill-overs* are interactive placements on cpu-moe and batch placements on full
  workers; *refused* counts gateway refusals (each followed by a client resend); *re-placed* counts
  migrations after churn.

Why not the issue's 10,000 req/s: with these speeds 1000 workers saturate near 800–1000 req/s,
so 10,000 req/s measures only queue growth (and takes minutes, because every refused request is
re-ranked on each client resend). 500 req/s loads the cluster moderately.

## Results

$results
DOC
echo "wrote $OUT" >&2
