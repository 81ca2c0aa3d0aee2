"""`tandem bench replay`: replaying greedy outputs through a token-only drafter reproduces exactly
the tokens per step the engine gets with every step verifying the drafter's tree."""

from __future__ import annotations

import pytest

from benchmarks.replay import accepted_path, replay
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig
from services.spec.drafter import DraftContext
from services.spec.registry import make_drafter
from services.spec.tree import ROOT, DraftTree
from tests.unit.test_speculative_engine import PROMPTS


def test_the_accepted_path_is_the_longest_root_path_spelling_the_truth():
    tree = DraftTree([1, 2, 3, 4, 5], [ROOT, 0, 0, 2, ROOT])
    assert accepted_path(tree, [1, 3, 4, 9]) == [0, 2, 3]
    assert accepted_path(tree, [1, 3]) == [0, 2], "never past the end of the truth"
    assert accepted_path(tree, [7]) == []


@pytest.mark.parametrize("name", ["ngram", "lookahead", "aded"])
@pytest.mark.parametrize("budget", [4, 12])
def test_replay_matches_the_engine_step_for_step(tiny, make_engine, name, budget):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    outputs = [plain.generate([p], params)[0].token_ids for p in PROMPTS]

    spec = make_engine(tiny, num_kv_blocks=256, block_size=4,
                       speculation=SpecConfig(drafter=name, max_nodes=budget, adaptive=False))
    for p in PROMPTS:  # one at a time, in order: stateful drafters learn across requests
        spec.generate([p], params)
    engine = spec.speculation_counters()

    context = DraftContext.of_engine(tiny, plain.runner, plain.block_manager)
    replayed = replay(make_drafter(name, context, SpecConfig(drafter=name)), PROMPTS, outputs, budget,
                      params.max_tokens)
    assert engine["decode_steps"] < engine["decode_tokens"], "some drafts were accepted: the check has teeth"
    assert (replayed["decode_steps"], replayed["decode_tokens"]) == (engine["decode_steps"], engine["decode_tokens"])
