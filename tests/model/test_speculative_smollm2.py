"""Greedy speculative output equals plain greedy decoding on SmolLM2, for every drafter, at
batch sizes 1 and 8, on 24 prompts: HumanEval, chat, and random token ids."""

from __future__ import annotations

import random

import pytest

from benchmarks.prompts import humaneval
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig
from services.spec.registry import DRAFTERS

CHATS = [
    "Write a Python function that merges two sorted lists.",
    "What is the difference between TCP and UDP?",
    "Explain what a hash table is, then give an example in Python.",
    "List the planets of the solar system in order.",
    "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox",
    "Write a limerick about a cat who codes.",
    "How do I reverse a linked list? Show the code twice: once iteratively, once recursively.",
    "Give me a JSON object describing a book with title, author and year.",
]


@pytest.fixture(scope="module")
def prompts(smollm2):
    rng = random.Random(0)
    chats = [[{"role": "user", "content": c}] for c in CHATS]
    random_ids = [[rng.randrange(100, smollm2.config.vocab_size) for _ in range(rng.randrange(5, 40))]
                  for _ in range(4)]
    return humaneval(12) + chats + random_ids


@pytest.fixture(scope="module")
def plain_outputs(smollm2, prompts):
    from services.runtime.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(num_kv_blocks=1024), loaded=smollm2)
    return [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=24))]


@pytest.mark.model
@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
def test_greedy_speculation_equals_plain(smollm2, smollm2_dir, make_engine, prompts, plain_outputs, drafter):
    assert len(prompts) >= 20
    spec = make_engine(smollm2, num_kv_blocks=1024, speculation=SpecConfig(
        drafter=drafter, max_nodes=16, draft_model=str(smollm2_dir)))
    params = SamplingParams(max_tokens=24)
    one_by_one = [spec.generate([p], params)[0].token_ids for p in prompts[:12]]
    batched = []
    for i in range(0, len(prompts), 8):
        batched += [o.token_ids for o in spec.generate(prompts[i:i + 8], params)]
    assert one_by_one == plain_outputs[:12], "batch 1"
    assert batched == plain_outputs, "batch 8"
