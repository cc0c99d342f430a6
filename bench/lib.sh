# Shared helpers of the bench/*.sh scripts (sourced, not run).

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port PORT SECONDS PID: until something accepts on 127.0.0.1:PORT; fails if PID dies.
wait_port() {
  local port=$1 limit=$2 pid=$3 i
  for ((i = 0; i < limit * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || { echo "process $pid exited before listening on $port" >&2; return 1; }
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listened on $port within ${limit}s" >&2
  return 1
}

# wait_http_ok URL SECONDS PID: until URL answers 200 (llama-server's /health once loaded).
wait_http_ok() {
  local url=$1 limit=$2 pid=$3 i
  for ((i = 0; i < limit * 4; i++)); do
    kill -0 "$pid" 2>/dev/null || { echo "process $pid exited before $url answered" >&2; return 1; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$url")" = 200 ] && return 0
    sleep 0.25
  done
  echo "$url did not answer 200 within ${limit}s" >&2
  return 1
}

# stop_pid PID: SIGTERM, then SIGKILL after 20 s; waits for it.
stop_pid() {
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 200; i++)); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

# Markdown lines describing this machine and checkout.
machine_md() {
  local cpu
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  echo "- machine: \`$(uname -a)\`"
  echo "- CPU: ${cpu:-unknown}, \`nproc\` = $(nproc), memory $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  if [ -n "${GIT_COMMIT:-}" ]; then
    echo "- git commit: $GIT_COMMIT"
  else
    echo "- git commit: \`$(git rev-parse HEAD)\`$(git diff --quiet HEAD 2>/dev/null || echo ' (working tree has uncommitted changes)')"
  fi
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
}

# The llama.cpp inside the worker: the llama-cpp-sys-2 version in Cargo.lock, its crate commit and
# the ggml version of its vendored tree.
worker_llama_md() {
  local ver dir ggml sha
  ver=$(awk '/^name = "llama-cpp-sys-2"/ {getline; gsub(/[^0-9.]/, "", $0); print; exit}' Cargo.lock)
  dir=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$ver" 2>/dev/null | head -1)
  if [ -n "$dir" ]; then
    ggml=$(awk -F'[ )]' '/set\(GGML_VERSION_(MAJOR|MINOR|PATCH) / {printf "%s%s", sep, $2; sep="."}' "$dir/llama.cpp/ggml/CMakeLists.txt")
    sha=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["git"]["sha1"][:10])' "$dir/.cargo_vcs_info.json" 2>/dev/null || echo unknown)
  fi
  echo "llama-cpp-2 $(awk '/^name = "llama-cpp-2"/ {getline; gsub(/[^0-9.]/, "", $0); print; exit}' Cargo.lock) / llama-cpp-sys-2 $ver (llama-cpp-rs commit ${sha:-unknown}, vendored ggml ${ggml:-unknown}; the llama.cpp commit is not recorded in the crate)"
}
