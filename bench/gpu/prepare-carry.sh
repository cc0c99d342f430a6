#!/usr/bin/env bash
# Fills the carry folder for bench/gpu/run-on-device.sh (default target/gpu-carry, ignored by git):
# the CUDA worker, gateway, moectl, moe-bench and etcd (xz), upstream llama-server built here with
# CUDA (or, without it, a trimmed llama.cpp source tarball to build there), the gguf wheel, the
# synthetic-model generator (scripts/make_gptoss_like.py) and, when given, the GPT-2 vocabulary the
# published results used (without it the generator falls back to a byte-level vocabulary), libgomp
# as a fallback.
#
# usage: bench/gpu/prepare-carry.sh CUDA_WORKER_BINARY [CARRY_DIR]
#   CUDA_WORKER_BINARY: from `source DIR/env.sh && CMAKE_CUDA_ARCHITECTURES=90 cargo build --release
#   --features cuda -p moe-worker --target-dir ...` (see shared/GPU.md)
# env: GPT2_VOCAB (optional: llama.cpp's models/ggml-vocab-gpt-2.gguf)
#      LLAMA_SERVER_BUILD (default ~/.cache/moe-cluster/llama-server-cuda-portable: from
#      `bench/build-llama-server.sh --cuda --portable` after `source DIR/env.sh`)
# The device call carries at most 64 MiB: the folder's total is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKER=${1:?CUDA worker binary}
CARRY=${2:-target/gpu-carry}
GPT2_VOCAB=${GPT2_VOCAB:-}
LLAMA_SERVER_BUILD=${LLAMA_SERVER_BUILD:-$HOME/.cache/moe-cluster/llama-server-cuda-portable}
mkdir -p "$CARRY"
nice -n 19 cargo build --release -q -p moe-bench -p moe-gateway -p moectl
xz_into() { # SRC NAME: stripped and xz-compressed, only when SRC is newer
  [ "$CARRY/$2.xz" -nt "$1" ] && return 0
  local tmp; tmp=$(mktemp)
  cp "$1" "$tmp" && strip "$tmp" 2>/dev/null || true
  nice -n 19 xz -T2 -9 -c "$tmp" >"$CARRY/$2.xz"
  rm -f "$tmp"
}
T=${CARGO_TARGET_DIR:-target}/release
xz_into "$T/moe-bench" moe-bench
xz_into "$T/moe-gateway" moe-gateway
xz_into "$T/moectl" moectl
xz_into "$(command -v etcd)" etcd
xz_into "$WORKER" moe-worker-cuda
if [ -x "$LLAMA_SERVER_BUILD/bin/llama-server" ]; then
  if [ ! "$CARRY/llama-server-cuda.tar.xz" -nt "$LLAMA_SERVER_BUILD/bin/llama-server" ]; then
    S=$(mktemp -d); mkdir -p "$S/bin"
    cp "$LLAMA_SERVER_BUILD/bin/llama-server" "$S/bin/" && strip "$S/bin/llama-server"
    tar -cJf "$CARRY/llama-server-cuda.tar.xz" -C "$S" bin
    rm -rf "$S"
  fi
  rm -f "$CARRY/llama.cpp-src.tar.xz"
else
  bash bench/build-llama-server.sh --pack "$PWD/$CARRY/llama.cpp-src.tar.xz" >/dev/null
fi
[ -f "$CARRY"/gguf-0.19.0-py3-none-any.whl ] || python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY" gguf==0.19.0
cp scripts/make_gptoss_like.py "$CARRY/"
if [ -n "$GPT2_VOCAB" ]; then cp "$GPT2_VOCAB" "$CARRY/ggml-vocab-gpt-2.gguf"; else rm -f "$CARRY/ggml-vocab-gpt-2.gguf"; fi
cp "$(gcc -print-file-name=libgomp.so.1)" "$CARRY/libgomp.so.1"
du -ch "$CARRY"/* | tail -20
