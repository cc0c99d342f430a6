#!/usr/bin/env bash
# Fills the carry folder for bench/gpu/run-on-device.sh (default target/gpu-carry, ignored by git):
# the CUDA worker (xz), moe-bench, a trimmed llama.cpp source tarball from the llama-cpp-python
# sdist, the gguf wheel, the synthetic-model generator and its vocabulary, libgomp as a fallback.
#
# usage: bench/gpu/prepare-carry.sh CUDA_WORKER_BINARY [CARRY_DIR]
#   CUDA_WORKER_BINARY: from `source DIR/env.sh && CMAKE_CUDA_ARCHITECTURES=90 cargo build --release
#   --features cuda -p moe-worker --target-dir ...` (see shared/GPU.md)
# env: GPU_SHARED (default ../shared/gpu: make_gptoss_like.py, ggml-vocab-gpt-2.gguf)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKER=${1:?CUDA worker binary}
CARRY=${2:-target/gpu-carry}
GPU_SHARED=${GPU_SHARED:-../shared/gpu}
mkdir -p "$CARRY"
nice -n 19 cargo build --release -q -p moe-bench
cp "${CARGO_TARGET_DIR:-target}/release/moe-bench" "$CARRY/" && strip "$CARRY/moe-bench"
[ "$CARRY/moe-worker-cuda.xz" -nt "$WORKER" ] || nice -n 19 xz -T2 -9 -c "$WORKER" >"$CARRY/moe-worker-cuda.xz"
bash bench/build-llama-server.sh --pack "$PWD/$CARRY/llama.cpp-src.tar.gz" >/dev/null
[ -f "$CARRY"/gguf-0.19.0-py3-none-any.whl ] || python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY" gguf==0.19.0
cp "$GPU_SHARED/make_gptoss_like.py" "$GPU_SHARED/ggml-vocab-gpt-2.gguf" "$CARRY/"
cp "$(gcc -print-file-name=libgomp.so.1)" "$CARRY/libgomp.so.1"
du -ch "$CARRY"/* | tail -20
