"""Bad input gets an error that names the field and says what was expected."""

from __future__ import annotations

import pytest

from services.runtime.errors import InvalidRequestError, ModelLoadError
from services.runtime.loader import load_model
from services.runtime.sampling_params import SamplingParams


@pytest.mark.parametrize("prompt", ["", [], [-1], [10**9], [1.5], ["hello"]])
def test_bad_prompts(tiny, make_engine, prompt):
    engine = make_engine(tiny, num_kv_blocks=16, block_size=4)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request(prompt, SamplingParams())
    assert e.value.field.startswith("prompt")


@pytest.mark.parametrize("params,field", [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(max_tokens=-3), "max_tokens"),
    (SamplingParams(temperature=-0.1), "temperature"),
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(seed=-5), "seed"),
    (SamplingParams(stop=("",)), "stop[0]"),
    (SamplingParams(stop_token_ids=(100000,)), "stop_token_ids[0]"),
])
def test_bad_sampling_params(tiny, make_engine, params, field):
    engine = make_engine(tiny, num_kv_blocks=16, block_size=4)
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request([1, 2, 3], params)
    assert e.value.field == field
    assert not engine.has_unfinished_requests()


def test_prompt_longer_than_context(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=16, block_size=4, max_model_len=32)
    with pytest.raises(InvalidRequestError, match="32 tokens"):
        engine.add_request(list(range(1, 40)), SamplingParams())


@pytest.mark.parametrize("messages,field", [
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": "hi"}, 5], "messages[1]"),
])
def test_bad_chat_messages(smollm2, make_engine, messages, field):
    engine = make_engine(smollm2, num_kv_blocks=8)
    with pytest.raises(InvalidRequestError) as e:
        engine.tokenize(messages)
    assert e.value.field == field


def test_duplicate_request_id(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=16, block_size=4)
    engine.add_request([1, 2], SamplingParams(max_tokens=2), request_id="a")
    with pytest.raises(InvalidRequestError, match="already running"):
        engine.add_request([1, 2], SamplingParams(), request_id="a")
    while engine.has_unfinished_requests():
        engine.step()


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'.*smollm2-135m-instruct"):
        load_model("no-such-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM"):
        load_model(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(f))
