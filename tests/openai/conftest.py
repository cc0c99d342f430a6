"""Shared fixtures of the API tests: a real cluster, and the official `openai` client for it.

The session fixture starts a real cluster on free loopback ports: etcd (its own temp data dir),
one `moe-worker` running llama.cpp on the CPU with the SmolLM2 test model, two small ones with
the harmony test models (`tiny-harmony`, `tiny-harmony-scripted`), and `moe-gateway` with
`--http-listen`. Every wait is bounded.

Environment: MOE_BIN_DIR (default target/debug), MOE_TEST_MODEL (default
models/smollm2-moe-4x2.gguf; built with scripts/make_test_models.py when missing).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "smollm2-moe-4x2"
# Random weights, harmony tokens and template (scripts/make_test_models.py): output under grammars.
HARMONY_MODEL = "tiny-harmony"
# Same tokens and template, bigram weights whose greedy reply is one fixed harmony message pair
# (analysis, then final): the reasoning/content separation end to end (test_chat_fidelity.py).
SCRIPTED_MODEL = "tiny-harmony-scripted"
WORKER_ID = "w1"
STARTUP_TIMEOUT_S = 180
RELEASE_TIMEOUT_S = 10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    http: str
    grpc: str
    etcd: str
    procs: dict[str, subprocess.Popen]
    logs: Path

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.log_tail(name)}")

    def advert(self) -> dict:
        out = subprocess.run(
            ["etcdctl", "--endpoints", self.etcd, "get", f"/moe/v1/workers/{WORKER_ID}",
             "--print-value-only"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return json.loads(out)


def wait_until(what: str, predicate, timeout_s: float, interval_s: float = 0.2, check=None):
    """Polls `predicate` until it returns a truthy value, failing after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            last = predicate()
        except Exception as e:  # noqa: BLE001 - reported if the wait fails
            last = e
        else:
            if last:
                return last
        time.sleep(interval_s)
    raise TimeoutError(f"{what} did not happen within {timeout_s}s (last: {last!r})")


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def http_post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest):
    bin_dir = Path(os.environ.get("MOE_BIN_DIR", ROOT / "target" / "debug"))
    model = Path(os.environ.get("MOE_TEST_MODEL", ROOT / "models" / f"{MODEL_NAME}.gguf"))
    if not model.is_absolute():
        model = ROOT / model
    if not bin_dir.is_absolute():
        bin_dir = ROOT / bin_dir
    for b in ("moe-worker", "moe-gateway"):
        if not (bin_dir / b).exists():
            pytest.fail(f"{bin_dir / b} is missing: cargo build -p moe-gateway -p moe-worker")
    if not model.exists():
        subprocess.run([sys.executable, "scripts/make_test_models.py", "--only", "smollm2"],
                       cwd=ROOT, check=True, timeout=600)
    harmony = model.with_name(f"{HARMONY_MODEL}.gguf")
    scripted = model.with_name(f"{SCRIPTED_MODEL}.gguf")
    for path, only in ((harmony, HARMONY_MODEL), (scripted, SCRIPTED_MODEL)):
        if not path.exists():
            subprocess.run([sys.executable, "scripts/make_test_models.py", "--only", only,
                            "--out-dir", str(path.parent)], cwd=ROOT, check=True, timeout=600)

    tmp = Path(tempfile.mkdtemp(prefix="moe-openai-"))
    eport, pport, wport, gport, hport, w2port, w3port = (free_port() for _ in range(7))
    etcd_url = f"http://127.0.0.1:{eport}"
    procs: dict[str, subprocess.Popen] = {}
    c = Cluster(http=f"http://127.0.0.1:{hport}", grpc=f"127.0.0.1:{gport}", etcd=etcd_url,
                procs=procs, logs=tmp)

    def spawn(name: str, args: list[str]) -> None:
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        with open(tmp / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                           env=env)

    keep = True  # logs stay (and are printed) unless every test passed
    try:
        spawn("etcd", [
            "etcd", "--name", "t", "--data-dir", str(tmp / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-cluster", f"t=http://127.0.0.1:{pport}",
        ])
        wait_until("etcd healthy", lambda: subprocess.run(
            ["etcdctl", "--endpoints", etcd_url, "endpoint", "health"],
            capture_output=True, timeout=5).returncode == 0, 30, check=c.check_alive)
        spawn("worker", [
            str(bin_dir / "moe-worker"), "--model", str(model), "--offload", "full",
            "--listen", f"127.0.0.1:{wport}", "--etcd", etcd_url, "--id", WORKER_ID,
            "--ctx-size", "8192", "--parallel", "4",  # 2048 cells per sequence
            # Sequential decode: the one batch-invariant mode on the CPU (batched CPU decode is
            # not: docs/benchmarks/batch-invariance.md); the batch_invariant tests need one.
            "--decode-mode", "sequential",
            # Adverts are rewritten on a meaningful change or once a lease TTL (docs/registry.md):
            # a slot freed below the last free one shows within 3 s, inside RELEASE_TIMEOUT_S.
            "--lease-ttl", "3s",
        ])
        spawn("gateway", [
            str(bin_dir / "moe-gateway"), "--listen", c.grpc,
            "--http-listen", f"127.0.0.1:{hport}", "--etcd", etcd_url,
        ])
        spawn("harmony-worker", [
            str(bin_dir / "moe-worker"), "--model", str(harmony), "--offload", "full",
            "--listen", f"127.0.0.1:{w2port}", "--etcd", etcd_url, "--id", "w2",
            "--ctx-size", "2048", "--parallel", "2", "--threads", "1",
        ])
        spawn("scripted-worker", [
            str(bin_dir / "moe-worker"), "--model", str(scripted), "--offload", "full",
            "--listen", f"127.0.0.1:{w3port}", "--etcd", etcd_url, "--id", "w3",
            "--ctx-size", "1024", "--parallel", "2", "--threads", "1",
        ])
        models = {MODEL_NAME, HARMONY_MODEL, SCRIPTED_MODEL}
        wait_until("gateway /health ready with all models",
                   lambda: models <= set(http_get(f"{c.http}/health")[1].get("models", [])),
                   STARTUP_TIMEOUT_S, interval_s=0.5, check=c.check_alive)
        yield c
        keep = request.session.testsfailed > 0 or "MOE_TEST_KEEP_LOGS" in os.environ
    finally:
        for name in ("gateway", "worker", "harmony-worker", "scripted-worker", "etcd"):
            if name in procs:
                stop(procs[name])
        if keep:
            for name in procs:
                print(f"--- {name} log ({tmp / name}.log) ---\n{c.log_tail(name)}",
                      file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture()
def client(cluster: Cluster) -> openai.OpenAI:
    # No retries: the tests check the first answer's status.
    return openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0,
                         timeout=120)


