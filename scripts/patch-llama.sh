#!/usr/bin/env bash
# Applies moe-cluster's llama.cpp patches (patches/llama.cpp/*.patch, in name order) to a llama.cpp
# source tree. Each patch is applied once: one already in place is reported and skipped, and one
# that applies neither way stops the script (the tree is another llama.cpp version).
#
#   scripts/patch-llama.sh DIR          DIR: a llama.cpp tree (the one holding ggml/ and src/)
#   scripts/patch-llama.sh --registry   the llama.cpp inside llama-cpp-sys-2's unpacked crate in the
#                                       cargo registry, at the version Cargo.lock pins (run `cargo
#                                       fetch` first); used by scripts/test.sh, scripts/up.sh and
#                                       both builders of docker/Dockerfile.worker before they build
#
# 0001 touches CUDA code only (ggml/src/ggml-cuda); 0002 touches the CPU backend (ggml/src/ggml-cpu).
# Patched files get new timestamps, and llama-cpp-sys-2's build script reruns on changed sources, so
# the next cargo build compiles them. Both are off unless switched on at run time.
# patches/llama.cpp/README.md says what each one does and why.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:?usage: $0 LLAMA_CPP_DIR | --registry}
if [ "$DIR" = --registry ]; then
  VER=$(awk '/^name = "llama-cpp-sys-2"/ {getline; gsub(/[^0-9.]/, "", $0); print; exit}' "$ROOT/Cargo.lock")
  DIR=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$VER"/llama.cpp 2>/dev/null | head -1)
  [ -n "$DIR" ] || { echo "llama-cpp-sys-2 $VER is not unpacked in the cargo registry: run cargo fetch" >&2; exit 1; }
fi
[ -d "$DIR/ggml/src" ] || { echo "$DIR is not a llama.cpp tree" >&2; exit 1; }
# git apply inside a git work tree would take paths from that repository's top: stop the search at DIR.
export GIT_CEILING_DIRECTORIES=$(cd "$DIR/.." && pwd)
for p in "$ROOT"/patches/llama.cpp/*.patch; do
  name=$(basename "$p")
  if (cd "$DIR" && git apply -p1 --check "$p" 2>/dev/null); then
    (cd "$DIR" && git apply -p1 "$p")
    echo "applied $name to $DIR"
  elif (cd "$DIR" && git apply -p1 -R --check "$p" 2>/dev/null); then
    echo "already applied: $name"
  else
    echo "$name applies to neither side of $DIR (another llama.cpp version?)" >&2
    exit 1
  fi
done
