"""The draft worker's copy of each request, driven directly (no Ray): messages bring it up to
date, assumed tokens (PEARL) stay while messages agree and are rewound when they do not."""

from __future__ import annotations

import pytest

from services.runtime.engine import EngineConfig
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig
from services.workers.draft_messages import ProposeItem, ReleaseItem, RequestSync
from services.workers.draft_worker import DraftWorker

PARAMS = SamplingParams(max_tokens=32)


@pytest.fixture
def worker(tiny_dir):
    spec = SpecConfig(drafter="draft-model", draft_model=str(tiny_dir))
    return DraftWorker("draft-0", EngineConfig(model=str(tiny_dir), speculation=spec))


def _sync(start, tokens, prompt=6):
    return RequestSync("r", start, tokens, prompt, PARAMS, seed=1)


def test_messages_extend_the_copy_and_release_frees_the_draft_cache(worker):
    prompt = list(range(30, 36))
    (tree,) = worker.propose([], [ProposeItem(_sync(0, prompt), 4)])
    assert 0 < len(tree) <= 4 and worker.requests["r"].token_ids == prompt
    worker.propose([], [ProposeItem(_sync(6, [tree.tokens[0], 7]), 4)])
    assert worker.requests["r"].token_ids == prompt + [tree.tokens[0], 7]
    assert worker.load().used_blocks > 0
    worker.apply([ReleaseItem("r")])
    assert not worker.requests and worker.load().used_blocks == 0 and worker.leaked_blocks() == []


def test_assumed_tokens_stay_while_messages_agree_and_are_rewound_when_not(worker):
    prompt = list(range(30, 36))
    worker.propose([], [ProposeItem(_sync(0, prompt), 4)])
    worker.propose_ahead([], [ProposeItem(_sync(6, []), 4)], [[40, 41, 42]])
    seq = worker.drafter.seqs["r"]
    assert worker.requests["r"].token_ids == prompt + [40, 41, 42] and seq.computed == 9
    worker.apply([])  # an observation-like message with nothing new changes nothing
    worker.propose([], [ProposeItem(_sync(6, [40, 41, 42, 43]), 4)])  # all assumed, plus the bonus
    assert worker.requests["r"].token_ids == prompt + [40, 41, 42, 43]
    assert seq.computed == 10  # caught up over the bonus only: nothing was recomputed

    worker.propose_ahead([], [ProposeItem(_sync(10, []), 4)], [[50, 51]])
    worker.propose([], [ProposeItem(_sync(10, [50, 9]), 4)])  # the second assumed token was rejected
    assert worker.requests["r"].token_ids == prompt + [40, 41, 42, 43, 50, 9]
    assert seq.computed == 12  # rewound to 11 (the agreed prefix), then caught up over the new token
    worker.apply([ReleaseItem("r")])


def test_a_message_out_of_sequence_is_refused(worker):
    with pytest.raises(ValueError, match="starts at token 3"):
        worker.propose([], [ProposeItem(_sync(3, [1, 2]), 4)])
