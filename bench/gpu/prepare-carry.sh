#!/usr/bin/env bash
# Fills the carry folder for bench/gpu/run-on-device.sh (default target/gpu-carry, ignored by git):
# - moe-worker built here against *shared* llama.cpp libraries (LLAMA_BUILD_SHARED_LIBS=1; the
#   device builds those libraries with CUDA from ours-llama.cpp-src.tar.xz, the exact source
#   llama-cpp-sys-2 vendors, in minutes on its 16 cores instead of an hour here), and the gateway,
#   moectl and moe-bench (release), etcd and etcdctl — each stripped and xz-compressed; the git
#   commit they were built from (git-commit);
# - ours-llama.cpp-src.tar.xz: llama-cpp-sys-2's llama.cpp/ without models, docs, examples, tests,
#   tools, with the project's patches applied (patches/llama.cpp; llama-patches lists them);
# - upstream-llama.cpp-src.tar.xz: llama-server's source (the llama-cpp-python sdist's vendored
#   llama.cpp, bench/build-llama-server.sh --pack);
# - the gguf wheel, the synthetic-model generator (scripts/make_gptoss_like.py) and, when given,
#   the GPT-2 vocabulary (GPT2_VOCAB; without it the generator falls back to bytes).
#
# usage: bench/gpu/prepare-carry.sh [CARRY_DIR]
# env: GPT2_VOCAB, CARGO_TARGET_DIR (default ~/.cache/moe-cluster/target-dyn: a separate cache, the
#      shared-library build of llama-cpp-sys-2 differs from the static one)
# The device call carries at most 64 MiB: the folder's total is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=${1:-target/gpu-carry}
GPT2_VOCAB=${GPT2_VOCAB:-}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/moe-cluster/target-dyn}
mkdir -p "$CARRY"
LLAMA_BUILD_SHARED_LIBS=1 nice -n 10 cargo build --release --locked -q -p moe-worker -p moe-gateway -p moectl -p moe-bench
xz_into() { # SRC NAME: stripped and xz-compressed
  local tmp; tmp=$(mktemp)
  cp "$1" "$tmp" && strip "$tmp" 2>/dev/null || true
  nice -n 10 xz -T2 -6 -c "$tmp" >"$CARRY/$2.xz"
  rm -f "$tmp"
}
T=$CARGO_TARGET_DIR/release
for b in moe-worker moe-gateway moectl moe-bench; do xz_into "$T/$b" "$b"; done
[ -f "$CARRY/etcd.xz" ] || xz_into "$(command -v etcd)" etcd
[ -f "$CARRY/etcdctl.xz" ] || xz_into "$(command -v etcdctl)" etcdctl   # bench/prefix-routing.sh
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- crates || echo ' (crates/ had uncommitted changes)')" >"$CARRY/git-commit"
VER=$(awk '/^name = "llama-cpp-sys-2"/ {getline; gsub(/[^0-9.]/, "", $0); print; exit}' Cargo.lock)
SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$VER" | head -1)
# ours-llama.cpp-src.tar.xz carries the project's llama.cpp patches (patches/llama.cpp, applied by
# scripts/patch-llama.sh); llama-patches names them and is how a changed patch set is noticed.
PATCHES="$(cd patches/llama.cpp && sha256sum -- *.patch)"
if [ ! -f "$CARRY/ours-llama.cpp-src.tar.xz" ] || [ "$(cat "$CARRY/llama-patches" 2>/dev/null)" != "$PATCHES" ]; then
  SRC_TMP=$(mktemp -d)
  tar -C "$SYS" --exclude=llama.cpp/models --exclude=llama.cpp/docs \
    --exclude=llama.cpp/examples --exclude=llama.cpp/tests --exclude=llama.cpp/tools --exclude=llama.cpp/gguf-py \
    --exclude=llama.cpp/pocs --exclude='llama.cpp/*.py' -cf - llama.cpp | tar -C "$SRC_TMP" -xf -
  scripts/patch-llama.sh "$SRC_TMP/llama.cpp"
  tar -C "$SRC_TMP" -cf - llama.cpp | nice -n 10 xz -T2 -6 >"$CARRY/ours-llama.cpp-src.tar.xz"
  rm -rf "$SRC_TMP"
  echo "$PATCHES" >"$CARRY/llama-patches"
fi
[ -f "$CARRY/upstream-llama.cpp-src.tar.xz" ] || bash bench/build-llama-server.sh --pack "$PWD/$CARRY/upstream-llama.cpp-src.tar.xz" >/dev/null
[ -f "$CARRY"/gguf-0.19.0-py3-none-any.whl ] || python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY" gguf==0.19.0
cp scripts/make_gptoss_like.py "$CARRY/"
[ -n "$GPT2_VOCAB" ] && cp "$GPT2_VOCAB" "$CARRY/ggml-vocab-gpt-2.gguf"
du -ch "$CARRY"/* | tail -20
