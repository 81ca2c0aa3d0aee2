"""The engine on a tiny random model: prefix caching, preemption, stops, cancellation, streaming."""

from __future__ import annotations

import pytest

from services.runtime.sampling_params import SamplingParams
from services.runtime.scheduler import SchedulerConfig

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def test_prefix_caching_reuses_blocks_and_keeps_output(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    shared = list(range(100, 130))  # 30 tokens: 7 full blocks
    first = engine.generate([shared + [1, 2, 3]], GREEDY)[0]
    assert first.cached_prompt_tokens == 0
    second = engine.generate([shared + [4, 5]], GREEDY)[0]
    assert second.cached_prompt_tokens == 28

    cold = make_engine(tiny, num_kv_blocks=64, block_size=4, enable_prefix_caching=False)
    assert cold.generate([shared + [4, 5]], GREEDY)[0].token_ids == second.token_ids
    # The same prompt again hits its own blocks, generated ones included, and still agrees.
    again = engine.generate([shared + [1, 2, 3]], GREEDY)[0]
    assert again.cached_prompt_tokens == 32 and again.token_ids == first.token_ids


def test_concurrent_requests_share_prefix_blocks(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    shared = list(range(200, 224))
    engine.generate([shared + [9]], SamplingParams(max_tokens=1))  # warm the cache
    a = engine.add_request(shared + [1, 2], GREEDY)
    b = engine.add_request(shared + [3], GREEDY)
    engine.step()
    ra, rb = engine.requests[a], engine.requests[b]
    assert ra.block_table[:6] == rb.block_table[:6]
    assert all(engine.block_manager.blocks[i].ref_count == 2 for i in ra.block_table[:6])
    while engine.has_unfinished_requests():
        engine.step()


def test_preemption_under_tiny_block_budget_gives_same_output(tiny, make_engine):
    prompts = [list(range(10 + 3 * i, 30 + 3 * i)) for i in range(6)]
    params = [SamplingParams(max_tokens=40, ignore_eos=True, temperature=float(i % 2), seed=i) for i in range(6)]
    roomy = make_engine(tiny, num_kv_blocks=256, block_size=4)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]

    tight = make_engine(tiny, num_kv_blocks=30, block_size=4)  # 120 slots for 6 x 60 tokens
    outs = tight.generate(prompts, params)
    assert tight.stats.preemptions > 0, "the budget should force preemption"
    assert [o.token_ids for o in outs] == expected


def test_chunked_prefill_matches_whole_prefill(tiny, make_engine):
    prompt = list(range(1, 120))
    whole = make_engine(tiny, num_kv_blocks=64, block_size=8).generate([prompt], GREEDY)[0]
    chunked = make_engine(tiny, num_kv_blocks=64, block_size=8,
                          scheduler=SchedulerConfig(max_num_batched_tokens=7)).generate([prompt], GREEDY)[0]
    assert chunked.token_ids == whole.token_ids


def test_stop_token_and_max_tokens(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"
    stop_at = out.token_ids[4]
    first = out.token_ids.index(stop_at)
    stopped = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=10, ignore_eos=True,
                                                          stop_token_ids=(stop_at,)))[0]
    assert stopped.token_ids == out.token_ids[:first + 1] and stopped.finish_reason == "stop"


def test_stop_string_cuts_text(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    full = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    streamed = []
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True, stop=(stop,)),
                             on_output=lambda o: streamed.append(o))
    while engine.has_unfinished_requests():
        engine.step()
    final = streamed[-1]
    assert final.request_id == rid and final.finished and final.finish_reason == "stop"
    assert final.text == text[:text.index(stop)]
    assert "".join(o.new_text for o in streamed) == final.text


def test_abort_frees_blocks_at_once(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    keep = engine.add_request(list(range(50, 70)), GREEDY)
    gone = engine.add_request(list(range(80, 100)), GREEDY)
    engine.step()
    engine.step()
    used = engine.block_manager.num_used_blocks
    held = len(engine.requests[gone].block_table)
    events = []
    engine.requests[gone].on_output = events.append
    assert engine.abort(gone)
    assert engine.block_manager.num_used_blocks == used - held
    assert events[-1].finished and events[-1].finish_reason == "abort"
    assert not engine.abort(gone)
    while engine.has_unfinished_requests():
        engine.step()
    assert keep not in engine.requests


def test_abort_waiting_request(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    rid = engine.add_request([1, 2, 3], GREEDY)
    assert engine.abort(rid)
    assert engine.step() == []


def test_stream_yields_deltas_then_finish(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    chunks = list(engine.stream([9, 8, 7], SamplingParams(max_tokens=6, ignore_eos=True)))
    assert [len(c.new_token_ids) for c in chunks] == [1] * 6
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert [t for c in chunks for t in c.new_token_ids] == chunks[-1].token_ids


def test_abandoned_stream_is_cancelled(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    it = engine.stream([9, 8, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert not engine.has_unfinished_requests()


def test_generation_stops_at_max_model_len(tiny, make_engine):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4, max_model_len=20)
    out = engine.generate([list(range(1, 16))], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


@pytest.mark.parametrize("seed", [0, 7, 2**63 - 1])
def test_seeded_sampling_is_reproducible(tiny, make_engine, seed):
    engine = make_engine(tiny, num_kv_blocks=64, block_size=4)
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)
    a = engine.generate([[1, 2, 3]], p)[0].token_ids
    b = engine.generate([[1, 2, 3]], p)[0].token_ids
    assert a == b
