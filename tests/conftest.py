"""Shared fixtures: the bundled model, tiny random models in Hugging Face format, leak checks."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.loader import LoadedModel, hf_directory, load_model
from services.runtime.registry import DEFAULT_MODEL

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The bundled GGUF converted to a Hugging Face directory (cached on disk after the first run)."""
    return hf_directory(DEFAULT_MODEL)[1]


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> LoadedModel:
    return load_model(DEFAULT_MODEL)


def make_tiny_hf_dir(path: Path, tokenizer_dir: Path, arch: str = "llama", seed: int = 0,
                     max_shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny randomly initialised transformers model (with a real tokenizer) to `path`."""
    import transformers

    kinds = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_cls, model_cls = kinds[arch]
    cfg = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    if arch == "mistral":
        cfg["sliding_window"] = None
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**cfg)).float().eval()
    with torch.no_grad():  # a wider spread than the default init, so logits are not near-uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
        if not cfg["tie_word_embeddings"]:  # peaked next-token distributions, as real LMs have
            model.lm_head.weight.mul_(6.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> LoadedModel:
    return load_model(str(tiny_dir))


def assert_no_leaks(engine: LLMEngine) -> None:
    bm = engine.block_manager
    held = [b.block_id for b in bm.blocks if b.ref_count]
    assert not held, f"blocks still referenced after all requests ended: {held[:10]}"
    assert bm.num_free_blocks == bm.num_blocks
    assert not engine.requests and engine.scheduler.num_unfinished == 0


@pytest.fixture
def make_engine() -> Iterator[Callable[..., LLMEngine]]:
    """Build engines; at teardown every one of them must hold no blocks (the no-leak invariant)."""
    engines: list[LLMEngine] = []

    def build(loaded: LoadedModel, **config) -> LLMEngine:
        config.setdefault("model", str(loaded.hf_dir))
        engine = LLMEngine(EngineConfig(**config), loaded=loaded)
        engines.append(engine)
        return engine

    yield build
    for e in engines:
        assert_no_leaks(e)


@pytest.fixture(scope="session")
def hf_from_gguf():
    """transformers' own GGUF loader on the bundled file: an oracle independent of our converter."""
    from transformers import AutoModelForCausalLM

    from services.runtime.registry import resolve

    src = resolve(DEFAULT_MODEL)
    return AutoModelForCausalLM.from_pretrained(
        str(src.path.parent), gguf_file=src.path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis to test against: 127.0.0.1:6379 if it answers, else an own redis-server (skips if neither)."""
    from tests.redis_server import redis_url as find_redis

    return find_redis()
