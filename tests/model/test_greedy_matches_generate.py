"""128 greedy tokens from SmolLM2 equal transformers `generate()` token for token."""

from __future__ import annotations

import warnings

import pytest
import torch

from services.runtime.sampling_params import SamplingParams

PROMPTS = [
    "Write a Python function that checks whether a number is prime, and explain how it works.",
    "Describe the water cycle in detail for a school student.",
    "List ten tips for staying productive while working from home, with a sentence on each.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a short story about a robot who learns to paint.",
]
NEAR_TIE = 1e-4


@pytest.mark.model
def test_greedy_128_tokens_equal_transformers(smollm2, hf_from_gguf, make_engine):
    engine = make_engine(smollm2, num_kv_blocks=256)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = engine.generate(chats, SamplingParams(max_tokens=128))
    near_ties = []
    for chat, out in zip(chats, outs):
        ids = engine.tokenize(chat)
        with torch.no_grad():
            ref = hf_from_gguf.generate(torch.tensor([ids]), max_new_tokens=128, do_sample=False)[0, len(ids):]
        ref = ref.tolist()
        if out.token_ids == ref:
            continue
        at = next(i for i, (a, b) in enumerate(zip(out.token_ids, ref)) if a != b) if any(
            a != b for a, b in zip(out.token_ids, ref)) else min(len(ref), len(out.token_ids))
        with torch.no_grad():
            logits = hf_from_gguf(torch.tensor([ids + ref[:at]])).logits[0, -1]
        top2 = logits.topk(2).values
        gap = (top2[0] - top2[1]).item()
        assert gap < NEAR_TIE, (
            f"prompt {chat[0]['content'][:40]!r}: first difference at output token {at} "
            f"(ours {out.token_ids[at:at + 3]}, transformers {ref[at:at + 3]}), reference top-2 gap {gap:.2e}"
        )
        near_ties.append((chat[0]["content"][:40], at, gap))
    if near_ties:
        warnings.warn(f"accepted differences at numeric near-ties (top-2 gap < {NEAR_TIE}): {near_ties}", stacklevel=1)
    assert sum(len(o.token_ids) for o in outs) >= 5 * 64, "prompts should produce long answers"
