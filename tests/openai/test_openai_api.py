"""The gateway's OpenAI-compatible HTTP API, driven by the official `openai` package.

The session fixture starts a real cluster on free loopback ports: etcd (its own temp data dir),
one `moe-worker` running llama.cpp on the CPU with the SmolLM2 test model, and `moe-gateway`
with `--http-listen`. Every wait is bounded.

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

    tmp = Path(tempfile.mkdtemp(prefix="moe-openai-"))
    eport, pport, wport, gport, hport = (free_port() for _ in range(5))
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
            "--ctx-size", "2048", "--parallel", "4",
        ])
        spawn("gateway", [
            str(bin_dir / "moe-gateway"), "--listen", c.grpc,
            "--http-listen", f"127.0.0.1:{hport}", "--etcd", etcd_url,
        ])
        wait_until("gateway /health ready",
                   lambda: http_get(f"{c.http}/health")[0] == 200,
                   STARTUP_TIMEOUT_S, interval_s=0.5, check=c.check_alive)
        yield c
        keep = request.session.testsfailed > 0 or "MOE_TEST_KEEP_LOGS" in os.environ
    finally:
        for name in ("gateway", "worker", "etcd"):
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


def test_streamed_chat_completion_answers_paris(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=48,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, roles, ids = "", None, None, [], set()
    for chunk in stream:
        ids.add(chunk.id)
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == MODEL_NAME
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert "Paris" in text, text
    assert roles == ["assistant"]
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= 1 and usage.prompt_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")


def test_non_streamed_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 16


def test_non_streamed_completion_stops_at_max_tokens(client):
    r = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0,
    )
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == MODEL_NAME
    assert "Paris" in r.choices[0].text, r.choices[0].text
    assert r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length"


def test_streamed_completion_ends_with_done(cluster):
    body = json.dumps({"model": MODEL_NAME, "prompt": "The capital of France is",
                       "max_tokens": 4, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"{cluster.http}/v1/completions", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.read().decode().splitlines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_models_lists_the_served_model(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL_NAME in ids
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        )
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_bad_input_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=0)
    assert e.value.body["type"] == "invalid_request_error"
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=4, n=2)
    assert e.value.body["param"] == "n"


def test_malformed_json_is_a_400_in_the_openai_shape(cluster):
    status, body = http_post(f"{cluster.http}/v1/chat/completions", b"{not json",
                             {"content-type": "application/json"})
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_health_reports_ready_models(cluster):
    status, body = http_get(f"{cluster.http}/health")
    assert status == 200
    assert body["status"] == "ok" and MODEL_NAME in body["models"]


def test_batch_latency_class_header_is_accepted(client):
    r = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=4, temperature=0,
        extra_headers={"x-moe-latency-class": "batch"},
    )
    assert r.usage.completion_tokens >= 1
    r = client.completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=4, temperature=0,
        extra_body={"metadata": {"latency_class": "batch"}},
    )
    assert r.usage.completion_tokens >= 1
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        metadata={"latency_class": "batch"},
    )
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=MODEL_NAME, prompt="hi", max_tokens=4,
            extra_headers={"x-moe-latency-class": "urgent"},
        )
    assert e.value.body["param"] == "x-moe-latency-class"


def test_abandoned_stream_frees_the_worker_slot(cluster, client):
    def idle(a: dict) -> bool:
        return (a["load"]["active"] == 0
                and a["capacity"]["free_kv_tokens"] == a["capacity"]["context_tokens"])

    wait_until("worker idle before the test", lambda: idle(cluster.advert()), RELEASE_TIMEOUT_S)
    # Greedy counting goes on far longer than the release wait: only cancellation frees the
    # slot in time.
    stream = client.completions.create(
        model=MODEL_NAME, prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=1500,
        temperature=0, stream=True,
    )
    with contextlib.closing(stream):
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None
        busy = wait_until("worker busy with the stream",
                          lambda: (a := cluster.advert())["load"]["active"] >= 1 and a,
                          RELEASE_TIMEOUT_S)
        assert busy["capacity"]["free_kv_tokens"] < busy["capacity"]["context_tokens"]
    started = time.monotonic()
    wait_until("worker slot freed after the client left", lambda: idle(cluster.advert()),
               RELEASE_TIMEOUT_S, check=cluster.check_alive)
    print(f"slot freed {time.monotonic() - started:.2f}s after the client left")
