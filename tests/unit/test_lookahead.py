"""Lookahead drafter: trie insertion and counts by source, multi-branch retrieval, hot start,
pruning and bounded memory, and losslessness inside the engine."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest

from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.request import Request
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig
from services.spec.drafters.lookahead import LookaheadConfig, LookaheadDrafter
from services.spec.tree import ROOT, DraftTree
from tests.conftest import assert_no_leaks

STUB_DETOKENIZER = SimpleNamespace()  # drafters never detokenize


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, list(prompt), SamplingParams(), 0, STUB_DETOKENIZER)  # type: ignore[arg-type]


def propose(drafter: LookaheadDrafter, req: Request, budget: int = 64) -> DraftTree:
    return drafter.propose([req], [budget])[0]


def generate(drafter: LookaheadDrafter, req: Request, tokens: list[int], per_step: int = 3) -> None:
    """Commit `tokens` a few per step, proposing before each step as the engine does."""
    for i in range(0, len(tokens), per_step):
        propose(drafter, req)
        req.token_ids.extend(tokens[i:i + per_step])


def has_root_path(tree: DraftTree, path: list[int]) -> bool:
    """Whether `path` is a chain of nodes starting at a child of the root."""
    parent = ROOT
    for token in path:
        match = [i for i in tree.children.get(parent, []) if tree.tokens[i] == token]
        if not match:
            return False
        parent = match[0]
    return True


def check_tree(tree: DraftTree, budget: int, config: LookaheadConfig) -> None:
    assert len(tree) <= min(budget, config.decoding_length)
    assert all(p < i for i, p in enumerate(tree.parents)), "parents first"
    assert all(d <= config.branch_length for d in tree.depths)
    for kids in tree.children.values():
        siblings = [tree.tokens[i] for i in kids]
        assert len(siblings) == len(set(siblings)), "siblings must carry distinct tokens"
    assert tree.sibling_dists is None


def occurs_in(needle: list[int], haystack: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def assert_consistent(drafter: LookaheadDrafter) -> None:
    """The per-trie counters match the stored nodes."""
    live = [n for n, p in enumerate(drafter._parent) if p >= 0]  # roots and freed ids excluded
    assert drafter.num_nodes == len(live)
    assert sum(t.output_nodes for t in drafter.tries.values()) == sum(drafter._output[n] > 0 for n in live)
    assert len(drafter._free) == len(drafter._parent) - len(live) - len(drafter.tries)


# ---- insertion and counts


def test_context_and_output_counts_are_kept_apart():
    drafter = LookaheadDrafter(LookaheadConfig(branch_length=4))  # windows of 5 tokens after the key
    a = make_request("a", [1, 2, 3, 4, 5, 1, 2, 3, 9])
    propose(drafter, a)
    assert drafter.counts([1, 2, 3], "a") == (2.0, 0.0)
    assert drafter.counts([2, 3, 4, 5, 1, 2], "a") == (1.0, 0.0)  # a full 5-token window
    assert drafter.counts([2, 3, 4, 5, 1, 2, 3], "a") is None  # one token past the window

    a.token_ids.extend([1, 2, 3, 4, 5, 6, 7])
    propose(drafter, a)
    # Generated text counts as the request's context and as output; the last prompt token keys
    # the first window.
    assert drafter.counts([9, 1, 2, 3, 4, 5], "a") == (1.0, 1.0)
    assert drafter.counts([1, 2, 3], "a") == (3.0, 1.0)
    # Windows still growing are in already, each token once: 3 keys [4, 5, 6, 7] so far.
    assert drafter.counts([3, 4, 5, 6, 7], "a") == (1.0, 1.0)
    a.token_ids.extend([8])
    propose(drafter, a)
    assert drafter.counts([3, 4, 5, 6, 7, 8], "a") == (1.0, 1.0)
    assert drafter.counts([3, 4, 5], "a") == (2.0, 1.0), "prompt and output once each, however often the window grew"

    # Output counts are shared; context counts belong to their request.
    b = make_request("b", [1, 2, 3, 8])
    propose(drafter, b)
    assert drafter.counts([1, 2, 3], "b") == (1.0, 1.0)
    assert drafter.counts([1, 2, 3], "a") == (3.0, 1.0)
    assert drafter.counts([3, 8], "a") == (0.0, 0.0)  # stored, but b's

    drafter.release(a)
    assert drafter.counts([7, 8]) == (0.0, 1.0), "output counts outlive the request"
    assert drafter.counts([1, 2, 3], "a") == (0.0, 1.0), "the context count goes at release"
    assert drafter.counts([1, 2, 3], "b") == (1.0, 1.0), "another request's context count stays"
    # Paths only a's context counted are gone from memory, not merely zeroed.
    assert drafter.counts([1, 2, 3, 9]) is None and drafter.counts([5, 1]) is None
    assert drafter.counts([5, 6]) == (0.0, 1.0)
    assert_consistent(drafter)


def test_a_request_copies_what_it_generated_a_step_ago():
    drafter = LookaheadDrafter()
    req = make_request("r", [1, 2, 3])
    line = [10, 11, 12, 13, 14, 15]
    generate(drafter, req, line + [99], per_step=7)  # one step commits the line
    req.token_ids.append(10)
    assert has_root_path(propose(drafter, req), line[1:] + [99]), "the line repeats from its first token"


def test_a_released_prompt_leaves_nothing_behind():
    drafter = LookaheadDrafter()
    rng = random.Random(0)
    req = make_request("r", [rng.randrange(1000) for _ in range(300)])
    propose(drafter, req)
    assert drafter.num_nodes > 300 and drafter.state_bytes() > 0
    drafter.release(req)
    assert drafter.num_nodes == 0 and not drafter.tries
    assert len(drafter._free) == len(drafter._parent), "every node id is free for reuse"


# ---- retrieval


def test_a_repeated_phrase_proposes_its_continuation():
    drafter = LookaheadDrafter()
    phrase = list(range(10, 40))
    req = make_request("r", [1, 2, *phrase, 3, 4, 5, 10, 11])  # ends by repeating the phrase's start
    tree = propose(drafter, req)
    depth = drafter.config.branch_length
    assert has_root_path(tree, phrase[2:2 + depth])
    assert max(tree.depths) == depth, "as deep as branch_length, no deeper"
    check_tree(tree, 64, drafter.config)


def test_two_continuations_of_the_query_are_two_branches_ranked_by_count():
    drafter = LookaheadDrafter()
    prompt = [7, 8, 1, 2, 3, 20, 7, 8, 4, 5, 6, 21, 7, 8, 4, 5, 6, 22, 7, 8]
    req = make_request("r", prompt)
    tree = propose(drafter, req)
    check_tree(tree, 64, drafter.config)
    assert has_root_path(tree, [4, 5, 6]) and has_root_path(tree, [1, 2, 3])
    first_children = [tree.tokens[i] for i in tree.children[ROOT]]
    assert first_children[:2] == [4, 1], "the continuation seen twice comes first"
    assert propose(drafter, req, budget=3).tokens == [4, 5, 6], "a small budget keeps the frequent branch"


def test_prompt_dominates_output_and_output_breaks_ties():
    drafter = LookaheadDrafter(LookaheadConfig(branch_length=2))
    # Another request generated `5 6 40` after `5 6` three times.
    teacher = make_request("t", [99])
    generate(drafter, teacher, [5, 6, 40, 0, 5, 6, 40, 0, 5, 6, 40, 0])
    drafter.release(teacher)
    # This request's prompt says `5 6 41`, once: the prompt wins.
    req = make_request("r", [5, 6, 41, 9, 5, 6])
    tree = propose(drafter, req, budget=1)
    assert tree.tokens == [41]
    # Tied prompt counts: the output count decides.
    req2 = make_request("r2", [5, 6, 41, 9, 5, 6, 40, 9, 5, 6])
    assert propose(drafter, req2, budget=1).tokens == [40]


def test_half_the_budget_is_kept_for_outputs():
    drafter = LookaheadDrafter(LookaheadConfig(branch_length=4))
    teacher = make_request("t", [99])
    generate(drafter, teacher, [5, 6, 70, 71, 72, 73, 0])
    drafter.release(teacher)
    # The prompt alone would fill a budget of 4 with its own branch (counted 3 times).
    req = make_request("r", [5, 6, 30, 31, 32, 33, 0, 5, 6, 30, 31, 32, 33, 0, 5, 6, 30, 31, 32, 33, 0, 5, 6])
    tree = propose(drafter, req, budget=4)
    assert has_root_path(tree, [70, 71]) and has_root_path(tree, [30, 31])
    assert len(tree) == 4


def test_budget_depth_and_shape_on_random_contexts():
    config = LookaheadConfig()
    drafter = LookaheadDrafter(config)
    rng = random.Random(1)
    finished: list[list[int]] = []  # what earlier requests generated, from their last prompt token on
    for r in range(20):
        vocab = rng.choice([3, 8, 50])
        req = make_request(f"r{r}", [rng.randrange(vocab) for _ in range(rng.randrange(1, 200))])
        for _ in range(5):
            req.token_ids.extend(rng.randrange(vocab) for _ in range(rng.randrange(1, 4)))
            for budget in (0, 1, 2, 5, 16, 64, 200):
                tree = propose(drafter, req, budget)
                check_tree(tree, budget, config)
                if budget == 0:
                    assert len(tree) == 0
                # Every drafted path, from the root token on, is text this request has seen
                # or an earlier one has generated.
                for node in range(len(tree)):
                    path = [req.token_ids[-1]] + [tree.tokens[i] for i in tree.path_to(node)]
                    assert any(occurs_in(path, text) for text in [req.token_ids, *finished]), path
        drafter.release(req)
        finished.append(req.token_ids[req.num_prompt_tokens - 1:])
        assert_consistent(drafter)
    assert not drafter._requests


def test_proposals_are_deterministic():
    rng = random.Random(2)
    prompt = [rng.randrange(20) for _ in range(400)]
    trees = [propose(LookaheadDrafter(), make_request("r", prompt), 32) for _ in range(2)]
    assert trees[0] == trees[1] and len(trees[0]) == 32


def test_other_requests_prompts_are_invisible():
    drafter = LookaheadDrafter()
    other = make_request("other", [1, 2, 3, 4, 5, 6])
    propose(drafter, other)
    req = make_request("r", [9, 9, 1, 2])
    assert len(propose(drafter, req)) == 0


# ---- hot start


def test_generated_text_is_retrievable_by_a_later_request():
    answer = list(range(100, 130))
    before = LookaheadDrafter()
    assert len(propose(before, make_request("b", [200, 201, 100, 101]))) == 0

    drafter = LookaheadDrafter()
    first = make_request("a", [1, 2, 3, 4, 5])
    generate(drafter, first, answer)
    drafter.release(first)
    later = make_request("b", [200, 201, 100, 101])
    assert has_root_path(propose(drafter, later), answer[2:14])
    # A prompt that ends like the earlier one is answered by the earlier answer.
    again = make_request("c", [42, 5])
    assert has_root_path(propose(drafter, again), answer[:12])


# ---- pruning and memory


def output_counts(sequences: list[list[int]], window: int) -> Counter:
    """Reference: the output count of every path (key, *tokens) the drafter should hold."""
    counts: Counter = Counter()
    for seq in sequences:
        for i in range(len(seq) - 1):
            tail = seq[i + 1:i + 1 + window]
            for j in range(1, len(tail) + 1):
                counts[(seq[i], *tail[:j])] += 1
    return counts


def test_squeeze_halves_counts_above_one_and_deletes_the_rest():
    config = LookaheadConfig(branch_length=2, max_output_nodes=3, squeeze_every=1)
    drafter = LookaheadDrafter(config)
    req = make_request("r", [99])
    outputs = [5, 1, 2, 5, 1, 2, 5, 1, 2, 5, 1, 3, 4]
    generate(drafter, req, outputs)
    propose(drafter, req)  # takes in the last step's tokens
    assert drafter.counts([5, 1]) == (0.0, 4.0)
    assert drafter.counts([5, 1, 2]) == (0.0, 3.0)
    assert drafter.counts([5, 1, 3]) == (0.0, 1.0)
    drafter.release(req)
    assert drafter.counts([5, 1]) == (0.0, 2.0)
    assert drafter.counts([5, 1, 2]) == (0.0, 1.5)
    assert drafter.counts([5, 1, 3]) is None

    # The whole forest against the reference: tries over a limit are squeezed, others intact.
    expected = output_counts([[99, *outputs]], config.branch_length + 1)
    by_key = Counter(path[0] for path in expected)
    for path, count in expected.items():
        over = by_key[path[0]] > config.max_output_nodes
        ancestors_survive = all(expected[path[:k]] > 1 for k in range(2, len(path)))
        want = (count / 2 if count > 1 and ancestors_survive else None) if over else count
        assert drafter.counts(list(path)) == (None if want is None else (0.0, want)), path
    assert_consistent(drafter)


def test_squeeze_waits_for_enough_updated_tries():
    config = LookaheadConfig(branch_length=2, max_output_nodes=1, squeeze_every=50)
    drafter = LookaheadDrafter(config)
    req = make_request("r", [99])
    generate(drafter, req, [5, 1, 2, 5, 1, 3])
    drafter.release(req)
    assert drafter.counts([5, 1, 3]) == (0.0, 1.0), "fewer than 50 tries updated: no pruning yet"


def test_squeeze_spares_nodes_a_running_prompt_counts():
    config = LookaheadConfig(branch_length=2, max_output_nodes=1, squeeze_every=1)
    drafter = LookaheadDrafter(config)
    running = make_request("running", [5, 1, 3, 8])
    propose(drafter, running)
    finished = make_request("finished", [99])
    generate(drafter, finished, [5, 1, 3, 5, 1, 4])
    drafter.release(finished)
    assert drafter.counts([5, 1, 3], "running") == (1.0, 0.0)
    assert drafter.counts([5, 1, 4]) is None
    running.token_ids.extend([5, 1])
    assert has_root_path(propose(drafter, running), [3, 8]), "the running request still sees its prompt"
    drafter.release(running)
    assert drafter.counts([5, 1, 3]) is None
    assert_consistent(drafter)


def test_memory_stays_bounded_as_requests_come_and_go():
    def churn(config: LookaheadConfig) -> list[int]:
        drafter = LookaheadDrafter(config)
        rng = random.Random(3)
        sizes = []
        for r in range(300):
            req = make_request(f"r{r}", [rng.randrange(200) for _ in range(60)])
            generate(drafter, req, [rng.randrange(200) for _ in range(40)], per_step=4)
            drafter.release(req)
            sizes.append(drafter.num_nodes)
        assert not drafter._requests
        # What remains is output text only: finished prompts left nothing behind.
        live = [n for n, p in enumerate(drafter._parent) if p >= 0]
        assert all(drafter._output[n] > 0 and drafter._holders[n] == 0 for n in live)
        assert_consistent(drafter)
        return sizes

    unbounded = churn(LookaheadConfig(squeeze_every=10**9))
    bounded = churn(LookaheadConfig(max_nodes=64, max_output_nodes=32, squeeze_every=100))
    assert unbounded[-1] > 2 * max(bounded[100:]), "without pruning, output nodes pile up"
    assert max(bounded[100:]) < 200 * 64, "each trie is brought back under its limit"
    assert max(bounded[200:]) <= 1.2 * max(bounded[100:200]), "no growth over time"


# ---- performance sanity (timed by hand; see the report, no timing assertion here)


def test_a_2000_token_context_proposes_a_budgeted_tree():
    rng = random.Random(4)
    phrases = [[rng.randrange(32000) for _ in range(rng.randrange(5, 30))] for _ in range(40)]
    context: list[int] = []
    while len(context) < 2000:
        context += rng.choice(phrases) if rng.random() < 0.5 else [rng.randrange(32000) for _ in range(10)]
    drafter = LookaheadDrafter()
    req = make_request("r", context[:2000])
    tree = propose(drafter, req, budget=16)
    check_tree(tree, 16, drafter.config)


# ---- in the engine


def test_greedy_output_equals_plain_decoding(tiny, make_engine):
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], list(range(30, 60)) + list(range(30, 40)), [9] * 12,
               [100, 200, 300, 100, 200], [50, 51, 50, 51, 50, 51, 50]]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = make_engine(tiny, num_kv_blocks=256, block_size=4)
    expected = [o.token_ids for o in plain.generate(prompts, params)]
    drafter = LookaheadDrafter()
    spec = LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=256, block_size=4,
                                  speculation=SpecConfig(max_nodes=12)), loaded=tiny, drafter=drafter)
    for _ in range(2):  # the second round starts hot from the first one's outputs
        assert [o.token_ids for o in spec.generate(prompts, params)] == expected
    assert spec.speculator.stats.drafts > 0 and spec.speculator.stats.accepted_tokens > 0
    assert not drafter._requests
    assert_no_leaks(spec)


@pytest.mark.parametrize("bad", [dict(branch_length=0), dict(decoding_length=0), dict(output_weight=2.0)])
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        LookaheadConfig(**bad)
