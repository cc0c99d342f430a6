#!/usr/bin/env bash
# Runs every test of moe-cluster: unit and end-to-end Rust tests (real etcd, real llama.cpp on
# the CPU, real gateways), the OpenAI SDK tests, and the Helm/Kubernetes checks.
# Installs what it needs first. Usage: ./scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh

export CARGO_TERM_COLOR=never
# Keep the build cache outside the checkout so fresh clones on the same machine reuse it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/moe-cluster/target}"
export MOE_BIN_DIR="$CARGO_TARGET_DIR/debug"
# Tests run several llama.cpp workers at once on few cores: OpenMP threads must sleep, not spin,
# while they wait (libgomp reads this when the test binary loads).
export OMP_WAIT_POLICY=PASSIVE

echo "== llama.cpp patches (patches/llama.cpp) on llama-cpp-sys-2's source in the cargo registry"
# The worker's batch-invariant CPU kernels (patch 0002) are what makes CPU `grouped` decode
# batch-invariant; --target-dir makes cargo rebuild llama-cpp-sys-2 when the patches changed.
cargo fetch --locked
bash scripts/patch-llama.sh --registry --target-dir "$CARGO_TARGET_DIR"
# The worker's tests then check that the build has the CPU switch (not silently unpatched).
export MOE_EXPECT_LLAMA_PATCHES=1
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build"
cargo build --workspace --bins --locked
echo "== GPU model generator: a 2-layer gpt-oss-shaped file plans (scripts/make_gptoss_like.py)"
GEN=$(mktemp -d)
python3 scripts/make_gptoss_like.py "$GEN/gptoss-2l.gguf" --layers 2 --sparse
# Captured, not piped into grep -q: moectl must not meet a closed pipe under pipefail.
PLAN=$("$MOE_BIN_DIR/moectl" plan "$GEN/gptoss-2l.gguf" --ctx 4096)
grep -q '2 layers, 32 experts (4 used)' <<<"$PLAN"
# Sliding-window layers (layer 0 of 2) keep 128 + 512 cells padded to 768 per stream.
grep -q 'sliding window 128 on 1 of 2 layers: 4 KV stream(s) of 1024 cells, 768 on sliding layers' <<<"$PLAN"
rm -rf "$GEN"
echo "== cargo test"
cargo test --workspace --locked -- --test-threads 2

if [ -d tests/openai ]; then
  echo "== OpenAI SDK tests"
  python3 -m pip install -q --disable-pip-version-check -r tests/openai/requirements.txt
  python3 -m pytest -q tests/openai
fi

echo "== Dashboard queries name catalogued metrics (docs/metrics.md)"
python3 scripts/check-dashboard.py

echo "== Helm chart and manifests"
bash scripts/check-k8s.sh
