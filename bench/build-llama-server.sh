#!/usr/bin/env bash
# Builds upstream llama.cpp's llama-server for side-by-side benchmarks against moe-worker.
#
# The source is the PyPI sdist of llama-cpp-python (it vendors a full llama.cpp tree; the
# llama-cpp-sys-2 crate ships only the library sources). It is downloaded with pip at run time into
# a cache OUTSIDE the repository and never committed.
#
# usage: bench/build-llama-server.sh [--cuda] [--portable] [--cache DIR] [--pack FILE.tar.xz] [--src-tarball FILE]
#   --cuda              build with -DGGML_CUDA=ON (needs nvcc; CMAKE_CUDA_ARCHITECTURES, default 90)
#   --portable          CPU code for the x86-64 feature set llama-cpp-sys-2 compiles the worker's
#                       llama.cpp with (GGML_NATIVE=OFF, AVX AVX2 BMI2 F16C FMA SSE4.2) instead of
#                       tuning for this machine: a code-for-code comparison, and a binary that runs on
#                       another x86-64 host (the GPU device), when built here
#   --cache DIR         default ${XDG_CACHE_HOME:-$HOME/.cache}/moe-cluster
#   --pack FILE         only write a trimmed source tarball of vendor/llama.cpp (for machines
#                       without network, e.g. the GPU device), then exit
#   --src-tarball FILE  build from such a trimmed tarball instead of downloading the sdist
# prints the path of the built binary on its last line.
set -euo pipefail

VERSION=0.3.36                 # llama-cpp-python; vendors ggml-org/llama.cpp 0c1e57098 (ggml 0.25.3)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/moe-cluster
CUDA=0 PORTABLE=0 PACK= SRC_TARBALL=
while [ $# -gt 0 ]; do
  case $1 in
    --cuda) CUDA=1 ;;
    --portable) PORTABLE=1 ;;
    --cache) CACHE=$2; shift ;;
    --pack) PACK=$2; shift ;;
    --src-tarball) SRC_TARBALL=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
  shift
done
mkdir -p "$CACHE"
SRC=$CACHE/src/llama_cpp_python-$VERSION/vendor/llama.cpp

if [ -n "$SRC_TARBALL" ]; then
  SRC=$CACHE/src/llama.cpp-trimmed
  if [ ! -f "$SRC/CMakeLists.txt" ]; then
    mkdir -p "$SRC" && tar -xf "$SRC_TARBALL" -C "$SRC"
  fi
elif [ ! -f "$SRC/CMakeLists.txt" ]; then
  mkdir -p "$CACHE/sdist" "$CACHE/src"
  SDIST=$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz
  [ -f "$SDIST" ] || python3 -m pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "llama-cpp-python==$VERSION"
  tar -xzf "$SDIST" -C "$CACHE/src"
fi

if [ -n "$PACK" ]; then
  # What a llama-server build needs: no models, docs, tests, benches, web UI sources.
  # Backends other than CPU and CUDA are only added to the build when enabled: leave them out.
  OTHER_BACKENDS=()
  for b in cann openvino webgpu et metal hexagon sycl vulkan opencl virtgpu musa hip zdnn blas; do
    OTHER_BACKENDS+=("--exclude=./ggml/src/ggml-$b")
  done
  tar -cf - -C "$SRC" --exclude=./models --exclude=./docs --exclude=./tests --exclude=./benches \
      --exclude=./media --exclude=./gguf-py --exclude=./examples/*/*.gguf --exclude='*.gguf' \
      --exclude=./tools/ui/node_modules --exclude=./.github --exclude=./pocs --exclude=./skills \
      "${OTHER_BACKENDS[@]}" . | xz -T2 -6 >"$PACK"
  echo "$PACK"
  exit 0
fi

if [ "$CUDA" = 1 ]; then
  BUILD=$CACHE/llama-server-cuda
  EXTRA=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}")
else
  BUILD=$CACHE/llama-server-cpu
  EXTRA=(-DGGML_CUDA=OFF)
fi
if [ "$PORTABLE" = 1 ]; then
  EXTRA+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_SSE42=ON)
  BUILD=$BUILD-portable
fi
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
# Without --portable, GGML_NATIVE (the default) tunes for this CPU.
cmake -S "$SRC" -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF "${EXTRA[@]}" >"$BUILD.configure.log" 2>&1 \
  || { tail -30 "$BUILD.configure.log" >&2; exit 1; }
cmake --build "$BUILD" --target llama-server --parallel "${JOBS:-$(nproc)}" >"$BUILD.build.log" 2>&1 \
  || { tail -30 "$BUILD.build.log" >&2; exit 1; }
echo "$BUILD/bin/llama-server"
