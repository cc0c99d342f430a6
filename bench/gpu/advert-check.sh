#!/usr/bin/env bash
# On the GPU machine: what CUDA workers advertise about batch invariance, and what a request that
# requires it gets. CI checks this on the CPU only (crates/e2e/tests/batch_invariant.rs); here the
# accelerator is real. Three workers on one GPU, a 2-layer gpt-oss-shaped model:
#   auto     default flags: expected decode_mode=sequential, batch_invariant=true
#   batched  --decode-mode batched: expected batched, false (CUDA picks kernels by batch shape)
#   gl0      --gpu-layers 0: expected sequential, true (llama.cpp still offloads large batches to
#            the GPU, so auto stays sequential)
# then one gateway: `moectl generate --batch-invariant` four times (must never land on batched),
# the same with only the batched worker left (must fail FAILED_PRECONDITION), and a request
# without the field (says in its final line whether it was invariant).
#
#   bench/gpu/advert-check.sh CARRY_DIR     (carry from bench/gpu/prepare-carry.sh; results to $OUT)
# Builds llama.cpp on every core (no upstream build), so it needs about 5 minutes of device time.
set -uo pipefail
CARRY=${1:?carry dir}
REPO=$PWD
WORK=${WORK:-/root/moe-advert}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
cd "$WORK" || exit 1
source "$REPO/bench/lib.sh"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/advert-check.txt"; }
unxz_to() { python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' "$1" "$2"; }
for b in moe-worker moe-gateway moectl etcd; do unxz_to "$REPO/$CARRY/$b.xz" "$b" && chmod +x "$b"; done
command -v nvcc >/dev/null || export PATH=$(dirname "$(ls /usr/local/cuda*/bin/nvcc | head -1)"):$PATH
CUDA_LIB=$(ls -d /usr/local/cuda-13*/targets/x86_64-linux/lib /usr/local/cuda/targets/x86_64-linux/lib 2>/dev/null | head -1)
log "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); commit $(cat "$REPO/$CARRY/git-commit")"
# A second call on the same (still warm) machine reuses the build and the model.
if [ "$(cat build.rc 2>/dev/null)" != 0 ]; then
  rm -f build.rc
  ( JOBS=$(nproc) AVX2_CPU=0 bash "$REPO/bench/gpu/build-llama-shared.sh" "$REPO/$CARRY/ours-llama.cpp-src.tar.xz" "$WORK/ll" \
      >build.log 2>&1; echo $? >build.rc ) &
fi
if [ ! -f model.gguf ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$REPO/$CARRY"/gguf-*.whl
  PYTHONPATH=$WORK/site python3 "$REPO/$CARRY/make_gptoss_like.py" model.gguf.tmp --vocab-gguf "$REPO/$CARRY/ggml-vocab-gpt-2.gguf" \
    --layers 2 >make-model.log 2>&1 || { tail -5 make-model.log; exit 1; }
  mv model.gguf.tmp model.gguf
fi
while [ ! -f build.rc ]; do sleep 2; done
[ "$(cat build.rc)" = 0 ] || { tail -30 build.log; exit 1; }
log "llama.cpp built"
export LD_LIBRARY_PATH=$WORK/ll/build/bin${CUDA_LIB:+:$CUDA_LIB}
EP=$(free_port); PP=$(free_port)
./etcd --name m --data-dir "$WORK/etcd-data" --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
  --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
  --initial-cluster "m=http://127.0.0.1:$PP" >etcd.log 2>&1 &
PIDS=($!)
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done' EXIT
ETCD=http://127.0.0.1:$EP
wait_port "$EP" 20 "${PIDS[0]}" || exit 1
declare -A WPID
start_worker() { # ID FLAGS...
  local id=$1 port; shift; port=$(free_port)
  RUST_LOG=warn,moe_worker::engine=info ./moe-worker --model model.gguf --offload full --listen "127.0.0.1:$port" \
    --ctx-size 4096 --parallel 4 --etcd "$ETCD" --id "$id" --lease-ttl 3s "$@" >"$OUT/worker-$id.log" 2>&1 &
  WPID[$id]=$!; PIDS+=($!)
}
start_worker auto
start_worker batched --decode-mode batched
start_worker gl0 --gpu-layers 0
GP=$(free_port)
RUST_LOG=warn ./moe-gateway --listen "127.0.0.1:$GP" --etcd "$ETCD" >"$OUT/gateway.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do [ "$(./moectl workers --etcd "$ETCD" --json 2>/dev/null | grep -c '"ready"')" -ge 3 ] && break; sleep 1; done
./moectl workers --etcd "$ETCD" | tee -a "$OUT/advert-check.txt"
./moectl workers --etcd "$ETCD" --json >"$OUT/adverts.jsonl"
python3 - "$OUT/adverts.jsonl" <<'PY' | tee -a "$OUT/advert-check.txt"
import json, sys
want = {"auto": ("sequential", True), "batched": ("batched", False), "gl0": ("sequential", True)}
ok = True
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    a = json.loads(line)
    got = (a.get("decode_mode"), a.get("batch_invariant"))
    exp = want.get(a["id"])
    good = got == exp
    ok &= good
    print(f"{a['id']}: decode_mode={got[0]} batch_invariant={got[1]} system_fingerprint={a.get('system_fingerprint')} "
          f"expected {exp}: {'OK' if good else 'WRONG'}")
print("adverts:", "PASS" if ok else "FAIL")
PY
for i in 1 2 3 4; do
  ./moectl generate --gateway "127.0.0.1:$GP" --batch-invariant --max-tokens 8 "Once upon a time" 2>&1 | tail -1 | tee -a "$OUT/advert-check.txt"
done
./moectl generate --gateway "127.0.0.1:$GP" --max-tokens 8 --class batch "Once upon a time" 2>&1 | tail -1 | tee -a "$OUT/advert-check.txt"
kill "${WPID[auto]}" "${WPID[gl0]}"; wait "${WPID[auto]}" "${WPID[gl0]}" 2>/dev/null
for _ in $(seq 20); do [ "$(./moectl workers --etcd "$ETCD" --json 2>/dev/null | grep -c '"id"')" -le 1 ] && break; sleep 1; done
log "only the batched worker left:"
./moectl generate --gateway "127.0.0.1:$GP" --batch-invariant --max-tokens 8 "Once upon a time" 2>&1 | tail -2 | tee -a "$OUT/advert-check.txt"
log "done"
