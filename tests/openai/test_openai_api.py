"""The gateway's OpenAI-compatible HTTP API, driven by the official `openai` package.

The cluster comes from conftest.py: etcd, one `moe-worker` on the CPU with the SmolLM2 test model
and `moe-gateway` with `--http-listen`, on free loopback ports.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request

import openai
import pytest

from conftest import MODEL_NAME, RELEASE_TIMEOUT_S, http_get, http_post, wait_until


def test_streamed_chat_completion_answers_paris(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        # The template's default system prompt (used when there is none) derails this tiny model.
        messages=[{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What is the capital of France?"}],
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


def test_batch_invariant_is_accepted_and_the_system_fingerprint_returned(cluster, client):
    # The CPU worker decodes sequentially with a KV stream per sequence: batch-invariant.
    assert cluster.advert()["batch_invariant"] is True
    raw = client.completions.with_raw_response.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=4, temperature=0,
        extra_body={"batch_invariant": True},
    )
    assert raw.headers["x-moe-batch-invariant"] == "true"
    r = raw.parse()
    fingerprint = r.system_fingerprint
    assert fingerprint and fingerprint.startswith("fp_"), fingerprint
    assert r.usage.completion_tokens >= 1
    # The same worker, the same configuration: the same fingerprint, on chat too.
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, seed=7,
        temperature=0.7, extra_body={"batch_invariant": True},
    )
    assert chat.system_fingerprint == fingerprint
    # Streaming: on the chunk with the finish reason and on the usage chunk.
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"batch_invariant": True},
    )
    chunks = list(stream)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.system_fingerprint for c in finals] == [fingerprint]
    assert chunks[-1].usage is not None and chunks[-1].system_fingerprint == fingerprint
    # Not a boolean: refused, naming the field.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=MODEL_NAME, prompt="hi", max_tokens=2, extra_body={"batch_invariant": "yes"},
        )
    assert e.value.body["type"] == "invalid_request_error"


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
