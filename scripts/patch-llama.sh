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
#   ... --registry --target-dir T       also makes cargo rebuild llama-cpp-sys-2 in the target dir T
#                                       when T last built it with other patches (or none)
#
# 0001 touches CUDA code only (ggml/src/ggml-cuda); 0002 touches the CPU backend (ggml/src/ggml-cpu);
# 0003 adds an AVX-512 MXFP4 kernel to the CPU backend (compiled only for an AVX-512 -march).
# Cargo does not notice a changed registry source (it takes registry crates as immutable: a build
# from before the patch stays), hence --target-dir: T/llama-patches.sha256 records the patches T's
# llama-cpp-sys-2 was built with, and `cargo clean -p llama-cpp-sys-2` (dev and release) runs when
# they differ. 0001 and 0002 are off unless switched on at run time.
# patches/llama.cpp/README.md says what each one does and why.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:?usage: $0 LLAMA_CPP_DIR | --registry [--target-dir T]}
TARGET=
if [ "${2:-}" = --target-dir ]; then TARGET=${3:?--target-dir needs a directory}; fi
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
if [ -n "$TARGET" ]; then
  WANT=$(cat "$ROOT"/patches/llama.cpp/*.patch | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$TARGET/llama-patches.sha256" 2>/dev/null)" != "$WANT" ]; then
    echo "rebuilding llama-cpp-sys-2 in $TARGET: it was built with other llama.cpp patches (or none)"
    (cd "$ROOT" && cargo clean -q -p llama-cpp-sys-2 --target-dir "$TARGET" \
      && cargo clean -q -p llama-cpp-sys-2 --release --target-dir "$TARGET")
    mkdir -p "$TARGET" && echo "$WANT" >"$TARGET/llama-patches.sha256"
  fi
fi
