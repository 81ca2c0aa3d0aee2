"""The OpenAI-compatible HTTP gateway, called with the `openai` Python client (and raw HTTP where
the client hides the wire format)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from orchestrator.backend import embedded_backend
from orchestrator.security import SecurityConfig
from orchestrator.server import ServerConfig
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.sampling_params import SamplingParams
from tests.conftest import assert_no_leaks
from tests.grpc_harness import serving

CHAT = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def gateway(smollm2):
    engine = LLMEngine(EngineConfig(model=str(smollm2.hf_dir)), loaded=smollm2)
    config = ServerConfig(port=0, http_port=0, security=SecurityConfig(api_keys=("sk-test",)))
    with serving(config, embedded_backend(engine)) as (server, _):
        yield server.server, engine
    assert_no_leaks(engine)


@pytest.fixture
def client(gateway):
    server, _ = gateway
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="sk-test", max_retries=0)


@pytest.mark.model
def test_models_and_chat_completion_match_the_engine(gateway, client):
    _, engine = gateway
    assert [m.id for m in client.models.list().data] == [engine.loaded.name]
    reply = client.chat.completions.create(model=engine.loaded.name, messages=CHAT, max_tokens=12, temperature=0)
    expected = LLMEngine(EngineConfig(model=str(engine.loaded.hf_dir)), loaded=engine.loaded).generate(
        [CHAT], SamplingParams(max_tokens=12))[0]
    assert reply.choices[0].message.content == expected.text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.prompt_tokens == expected.prompt_tokens


@pytest.mark.model
def test_streamed_chat_and_completions_add_up_to_the_whole_answer(gateway, client):
    _, engine = gateway
    whole = client.chat.completions.create(model=engine.loaded.name, messages=CHAT, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=engine.loaded.name, messages=CHAT, max_tokens=16,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = client.completions.create(model=engine.loaded.name, prompt="def add(a, b):", max_tokens=10,
                                     temperature=0)
    streamed = client.completions.create(model=engine.loaded.name, prompt="def add(a, b):", max_tokens=10,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text and text.usage.completion_tokens == 10


@pytest.mark.model
def test_errors_are_openai_shaped_with_the_field_named(gateway, client):
    server, engine = gateway
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=engine.loaded.name, messages=CHAT, top_p=3.0)
    assert err.value.body["param"] == "sampling.top_p"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=engine.loaded.name, prompt="hi", n=2)
    assert err.value.body["param"] == "n"
    bad_key = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    raw = urllib.request.Request(f"http://127.0.0.1:{server.http_port}/v1/completions", data=b"{not json",
                                 headers={"Authorization": "Bearer sk-test"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(raw, timeout=10)
    assert http.value.code == 400 and json.loads(http.value.read())["error"]["param"] == "body"
    health = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10)
    assert health.status == 200
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics", timeout=10).read().decode()
    assert "tandem_time_to_first_token_seconds" in metrics
