"""Prefill on one engine, decode on another (the engine half of disaggregation): the KV is
copied by hand here; tests/integration moves it between Ray workers."""

from __future__ import annotations

import pytest

from services.runtime.errors import ResourceExhaustedError
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig

PROMPTS = [list(range(10 + 5 * i, 40 + 7 * i)) for i in range(4)]


def _hand_over(prefill, decode, rid, prompt, params, seed):
    """Run the prefill engine until rid is handed off, then move its KV into the decode engine."""
    first = None
    while first is None:
        for o in prefill.step():
            if o.request_id == rid:
                assert o.finish_reason == "handoff"
                first = o.token_ids[0]
    held = prefill.take_handoff(rid)
    assert held.num_tokens == len(prompt) and held.seed == seed
    blocks = decode.add_prefilled(rid, prompt, first, params, seed)
    assert len(blocks) == len(held.block_table)
    for (pk, pv), (dk, dv) in zip(prefill.kv_cache.layers, decode.kv_cache.layers):
        dk[blocks] = pk[held.block_table]
        dv[blocks] = pv[held.block_table]
    prefill.release_handoff(rid)
    decode.activate(rid)
    return first


@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_handed_off_requests_decode_as_on_one_engine(tiny, make_engine, drafter):
    params = [SamplingParams(max_tokens=20, ignore_eos=True, temperature=float(i % 2), seed=i) for i in range(4)]
    expected = [o.token_ids for o in make_engine(tiny, num_kv_blocks=128, block_size=4).generate(PROMPTS, params)]

    prefill = make_engine(tiny, num_kv_blocks=64, block_size=4)
    decode = make_engine(tiny, num_kv_blocks=64, block_size=4, speculation=SpecConfig(drafter=drafter))
    firsts = {}
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        rid = f"r{i}"
        prefill.add_request(prompt, p, request_id=rid, seed=p.seed, hand_off=True)
        firsts[rid] = _hand_over(prefill, decode, rid, prompt, p, p.seed)
    assert not prefill.handoffs
    outputs = {}
    while decode.has_unfinished_requests():
        for o in decode.step():
            if o.finished:
                outputs[o.request_id] = o
    for i, want in enumerate(expected):
        got = outputs[f"r{i}"]
        assert [firsts[f"r{i}"]] + got.token_ids[1:] == want
        assert got.token_ids == want and got.finish_reason == "length"


def test_a_request_that_ends_at_its_first_token_is_not_handed_off(tiny, make_engine):
    prefill = make_engine(tiny, num_kv_blocks=64, block_size=4)
    out = prefill.generate([PROMPTS[0]], SamplingParams(max_tokens=1))[0]
    assert out.finish_reason == "length" and not prefill.handoffs
    rid = prefill.add_request(PROMPTS[0], SamplingParams(max_tokens=1), hand_off=True)
    while prefill.has_unfinished_requests():
        prefill.step()
    assert rid not in prefill.handoffs


def test_unclaimed_handoffs_expire_and_aborted_pending_requests_free_their_blocks(tiny, make_engine):
    prefill = make_engine(tiny, num_kv_blocks=64, block_size=4, handoff_lease_s=5.0)
    rid = prefill.add_request(PROMPTS[1], SamplingParams(max_tokens=8), hand_off=True)
    while prefill.has_unfinished_requests():
        prefill.step()
    held = prefill.take_handoff(rid)
    assert prefill.block_manager.num_used_blocks >= len(held.block_table) > 0
    assert prefill.expire_handoffs(now=held.expires_at - 1) == []
    assert prefill.expire_handoffs(now=held.expires_at) == [rid]
    assert prefill.block_manager.num_used_blocks == 0

    decode = make_engine(tiny, num_kv_blocks=64, block_size=4)
    decode.add_prefilled("x", PROMPTS[1], 7, SamplingParams(max_tokens=8), seed=1)
    assert decode.block_manager.num_used_blocks > 0
    assert decode.abort("x")  # its KV never came: nothing may stay held


def test_add_prefilled_without_room_says_so(tiny, make_engine):
    decode = make_engine(tiny, num_kv_blocks=4, block_size=4, max_model_len=16)
    with pytest.raises(ResourceExhaustedError, match="no KV blocks"):
        decode.add_prefilled("big", list(range(1, 15)), 3, SamplingParams(max_tokens=1), seed=0)
        decode.add_prefilled("big2", list(range(1, 15)), 3, SamplingParams(max_tokens=1), seed=0)
    decode.abort("big")
