"""Chat fidelity (issue 15): nothing silently ignored, and gRPC reflection that every client
speaks. Runs against the real cluster of conftest.py.
"""

from __future__ import annotations

import grpc
import openai
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from conftest import MODEL_NAME


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["audio"]}, "modalities"),
        ({"extra_body": {"no_such_option": 1}}, "no_such_option"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
    ],
)
def test_unsupported_field_is_refused_naming_it(client, kwargs, param):
    args = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2} | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    body = e.value.body
    assert body["param"] == param, body
    assert body["code"] == "unsupported_parameter", body
    assert param in body["message"], body


def test_explicit_default_values_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        presence_penalty=0, frequency_penalty=0, logprobs=False, response_format={"type": "text"},
        user="someone", store=False,
    )
    assert r.usage.completion_tokens >= 1


def test_grpcio_reflection_lists_the_api_and_calls_generate(cluster):
    with grpc.insecure_channel(cluster.grpc) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "moe.v1.Inference" in services, services
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("moe.v1.Inference").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        generate = channel.unary_stream(
            "/moe.v1.Inference/Generate",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        request = request_cls(prompt="The capital of France is", max_tokens=4, model=MODEL_NAME)
        messages = list(generate(request, timeout=120))
    text = "".join(m.text for m in messages)
    assert "Paris" in text, text
    assert messages[-1].finish_reason != 0
    assert messages[-1].usage.completion_tokens == 4
