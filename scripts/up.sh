#!/usr/bin/env bash
# Brings up a local moe-cluster on this machine and streams a completion through it:
# etcd, one `full` worker and one `cpu-moe` worker of the SmolLM2 MoE test model, a gateway.
# Installs what it needs first. The cluster keeps running until Ctrl-C (or pass --once to stop
# after the demo). Usage: ./scripts/up.sh [--once]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moe-cluster/target}"
# moe-cluster's llama.cpp patches (patches/llama.cpp: batch-invariant kernels, off unless the
# worker switches them on) on llama-cpp-sys-2's source in the cargo registry.
cargo fetch --locked
bash scripts/patch-llama.sh --registry --target-dir "$CARGO_TARGET_DIR"
cargo build --workspace --bins --locked
BIN="$CARGO_TARGET_DIR/debug"
MODEL="${MOE_MODEL:-models/smollm2-moe-4x2.gguf}"
RUN="$(mktemp -d /tmp/moe-cluster.XXXXXX)"
ETCD_PORT="${ETCD_PORT:-2379}"
GATEWAY="${MOE_GATEWAY_ADDR:-127.0.0.1:50051}"
ETCD="http://127.0.0.1:$ETCD_PORT"
# Two workers share this machine's cores: give each half, and let idle OpenMP threads sleep
# instead of spinning against the other worker.
THREADS=$(( $(nproc) / 2 )); [ "$THREADS" -ge 1 ] || THREADS=1
export OMP_WAIT_POLICY=PASSIVE

pids=()
cleanup() {
  echo "== stopping (SIGTERM: workers drain and deregister)"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT INT TERM

echo "== etcd on $ETCD (logs in $RUN)"
etcd --name local --data-dir "$RUN/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "local=http://127.0.0.1:$((ETCD_PORT + 1))" >"$RUN/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do etcdctl --endpoints "$ETCD" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done

echo "== workers: full and cpu-moe"
"$BIN/moe-worker" --model "$MODEL" --offload full --id full-0 --listen 127.0.0.1:50061 \
  --etcd "$ETCD" --ctx-size 4096 --parallel 4 --threads "$THREADS" >"$RUN/worker-full.log" 2>&1 &
pids+=($!)
"$BIN/moe-worker" --model "$MODEL" --offload cpu-moe --id cpu-moe-0 --listen 127.0.0.1:50062 \
  --etcd "$ETCD" --ctx-size 4096 --parallel 4 --threads "$THREADS" >"$RUN/worker-cpu-moe.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  [ "$(etcdctl --endpoints "$ETCD" get --prefix /moe/v1/workers/ --keys-only | grep -c workers)" -ge 2 ] && break
  sleep 0.2
done

echo "== gateway on $GATEWAY"
"$BIN/moe-gateway" --listen "$GATEWAY" --etcd "$ETCD" >"$RUN/gateway.log" 2>&1 &
pids+=($!)
sleep 1

"$BIN/moectl" workers --etcd "$ETCD"
echo
echo "== interactive request (lands on the full worker)"
"$BIN/moectl" generate --gateway "$GATEWAY" --max-tokens 32 "The capital of France is"
echo
echo "== batch request (lands on the cpu-moe worker)"
"$BIN/moectl" generate --gateway "$GATEWAY" --class batch --chat --max-tokens 48 "Name three French cities."

if [ "${1:-}" = "--once" ]; then exit 0; fi
cat <<TXT

The cluster is up. Try:
  $BIN/moectl generate --gateway $GATEWAY "Once upon a time"
  $BIN/moectl workers --etcd $ETCD
  grpcurl -plaintext $GATEWAY list
Ctrl-C stops it.
TXT
wait
