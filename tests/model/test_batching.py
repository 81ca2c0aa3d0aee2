"""Continuous batching changes nothing: each request of a mixed batch gets the tokens it gets alone."""

from __future__ import annotations

import pytest

from services.runtime.sampling_params import SamplingParams
from services.runtime.scheduler import SchedulerConfig

CHATS = [
    "Hi!",
    "What is 17 times 23?",
    "Write a haiku about autumn leaves falling on a quiet pond in the early morning.",
    "Explain recursion.",
    "Give me three names for a pet goldfish.",
    "Translate 'good morning' into French, Spanish and German, and say which is most common worldwide.",
    "Why is the sky blue?",
    "Summarise the plot of Romeo and Juliet in two sentences, then name the city where it is set.",
]


@pytest.mark.model
@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20),
    SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, top_k=50, seed=1234),
], ids=["greedy", "seeded-sampling"])
def test_batch_of_8_equals_alone(smollm2, make_engine, params):
    engine = make_engine(smollm2, num_kv_blocks=128)
    chats = [[{"role": "user", "content": c}] for c in CHATS]
    batched = engine.generate(chats, params)
    assert len({len(engine.tokenize(c)) for c in chats}) > 4, "prompt lengths should be mixed"
    for chat, together in zip(chats, batched):
        alone = engine.generate([chat], params)[0]
        assert together.token_ids == alone.token_ids, chat[0]["content"]


def test_tiny_batch_invariance_with_staggered_arrivals(tiny, make_engine):
    """Requests that join while others decode (and chunked prefills beside decodes) change nothing."""
    engine = make_engine(tiny, num_kv_blocks=200, block_size=4,
                         scheduler=SchedulerConfig(max_num_batched_tokens=24, max_num_seqs=8))
    prompts = [list(range(10 + i, 10 + i + 5 + 7 * i)) for i in range(8)]
    params = [SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.0 if i % 2 else 1.0, seed=i)
              for i in range(8)]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    ids, done = [], {}
    for p, sp in zip(prompts, params):
        ids.append(engine.add_request(p, sp))
        for o in engine.step() + engine.step():
            done[o.request_id] = o
    while engine.has_unfinished_requests():
        for o in engine.step():
            done[o.request_id] = o
    assert [done[i].token_ids for i in ids] == alone
