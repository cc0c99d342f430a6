#!/usr/bin/env bash
# Builds, ON the GPU machine, the CUDA flavour of the exact llama.cpp source that llama-cpp-sys-2
# vendors, as shared libraries (libllama, libggml*, libggml-cuda), with the host's native CPU flags
# (AVX-512/VNNI/AMX where present). A worker built here with `LLAMA_BUILD_SHARED_LIBS=1` (CPU, same
# source) then runs on the GPU with LD_LIBRARY_PATH pointing at these libraries: the llama.h/ggml.h
# ABI is the same source's, and the CUDA kernels compile in minutes on the device's 16 cores
# instead of an hour on a 2-core build machine.
#
#   bench/gpu/build-llama-shared.sh SRC_TARBALL BUILD_DIR
#     SRC_TARBALL: llama.cpp/ from ~/.cargo/registry/src/*/llama-cpp-sys-2-<ver> packed with
#                  `tar -cJf` (models, docs, examples, tests, tools left out)
# env: JOBS (default nproc); AVX2_CPU=1 also builds BUILD_DIR/build-avx2/bin/libggml-cpu.so, the CPU
#      backend alone for AVX2/FMA/F16C/BMI2 (what llama-cpp-sys-2 compiles for a generic x86-64
#      build): put that directory first on LD_LIBRARY_PATH to run the same worker with AVX2 CPU code.
# Prints the library directory on success.
set -euo pipefail
SRC=${1:?source tarball}
B=${2:?build dir}
mkdir -p "$B"
tar -C "$B" -xJf "$SRC"
NVCC=$(ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$B/llama.cpp" -B "$B/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
  -DGGML_CUDA=ON -DGGML_CUDA_NCCL=OFF -DCMAKE_CUDA_ARCHITECTURES=90 ${NVCC:+-DCMAKE_CUDA_COMPILER=$NVCC} \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$B/configure.log" 2>&1 \
  || { tail -30 "$B/configure.log"; exit 1; }
cmake --build "$B/build" --target llama -j "${JOBS:-$(nproc)}" >"$B/build.log" 2>&1 || { tail -40 "$B/build.log"; exit 1; }
if [ "${AVX2_CPU:-0}" = 1 ]; then
  cmake -S "$B/llama.cpp" -B "$B/build-avx2" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON \
    -DGGML_OPENMP=ON -DGGML_CUDA=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    >"$B/configure-avx2.log" 2>&1 || { tail -30 "$B/configure-avx2.log"; exit 1; }
  cmake --build "$B/build-avx2" --target ggml-cpu -j "${JOBS:-$(nproc)}" >"$B/build-avx2.log" 2>&1 \
    || { tail -40 "$B/build-avx2.log"; exit 1; }
fi
echo "$B/build/bin"
