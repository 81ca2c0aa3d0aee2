"""ADED: the tri-gram store, PUCT selection and the drafted trees."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from services.runtime.request import Request
from services.runtime.sampling_params import SamplingParams
from services.spec.drafters.aded import AdedConfig, AdedDrafter, Node, TrigramStore, puct, select_child
from services.spec.tree import ROOT, DraftTree


def make_request(tokens: list[int], request_id: str = "r0", num_prompt: int | None = None, seed: int = 7) -> Request:
    num_prompt = len(tokens) if num_prompt is None else num_prompt
    detokenizer: Any = None  # drafters never detokenize
    req = Request(request_id, list(tokens[:num_prompt]), SamplingParams(), seed, detokenizer)
    req.token_ids = list(tokens)
    return req


def root_paths(tree: DraftTree) -> set[tuple[int, ...]]:
    """Every root-to-node token path in the tree."""
    return {tuple(tree.tokens[j] for j in tree.path_to(i)) for i in range(len(tree))}


def assert_well_formed(tree: DraftTree, budget: int) -> None:
    assert len(tree) <= budget
    for i, p in enumerate(tree.parents):
        assert ROOT <= p < i
    for siblings in tree.children.values():
        tokens = [tree.tokens[i] for i in siblings]
        assert len(tokens) == len(set(tokens)), "siblings must have distinct tokens"


# --- the store ----------------------------------------------------------------------------


def test_prompt_trigrams_are_added_on_first_sight():
    drafter = AdedDrafter(AdedConfig(window=3))
    drafter.propose([make_request([5, 6, 7, 8, 5, 6, 7])], [8])
    # (5,6)->7 occurs twice in the prompt; the window (last 3 tokens: 5 6 7) adds it once more.
    assert drafter.store.get(5, 6) == {7: pytest.approx(0.12)}
    assert drafter.store.get(6, 7) == {8: pytest.approx(0.04)}
    assert drafter.store.get(7, 8) == {5: pytest.approx(0.04)}
    assert drafter.store.get(8, 7) is None


def test_online_update_adds_increment_per_step_inside_the_window():
    drafter = AdedDrafter(AdedConfig(window=4, prompt_increment=0.0))
    tokens = [1, 2, 3, 4]
    req = make_request(tokens)
    drafter.propose([req], [4])  # window 1 2 3 4
    assert drafter.store.get(1, 2) == {3: pytest.approx(0.04)}
    assert drafter.store.get(2, 3) == {4: pytest.approx(0.04)}
    req.token_ids.append(9)
    drafter.propose([req], [4])  # window 2 3 4 9: (1,2,3) slid out, (2,3,4) gains again
    assert drafter.store.get(1, 2) == {3: pytest.approx(0.04)}
    assert drafter.store.get(2, 3) == {4: pytest.approx(0.08)}
    assert drafter.store.get(3, 4) == {9: pytest.approx(0.04)}
    drafter.propose([req], [4])  # nothing new was committed: no second update for the same step
    assert drafter.store.get(2, 3) == {4: pytest.approx(0.08)}


def test_online_update_caps_weights():
    drafter = AdedDrafter(AdedConfig(window=3, prompt_increment=0.0))
    req = make_request([1, 2, 3])
    for step in range(1, 101):  # 100 * 0.04 = 4.0 without the cap
        drafter.propose([req], [4])
        if step == 50:
            assert drafter.store.get(1, 2)[3] == pytest.approx(2.0)
        req.token_ids.extend([1, 2, 3])  # the window is 1 2 3 again at each step
    assert drafter.store.get(1, 2)[3] == pytest.approx(3.0)


def test_rows_past_the_cap_evict_the_least_recently_updated():
    store = TrigramStore(max_rows=2, max_row_entries=8)
    store.add(1, 1, 1, 0.5, 3.0)
    store.add(2, 2, 2, 0.5, 3.0)
    store.add(1, 1, 9, 0.5, 3.0)  # row (1,1) is now the most recently updated
    store.add(3, 3, 3, 0.5, 3.0)
    assert store.get(2, 2) is None
    assert store.get(1, 1) == {1: 0.5, 9: 0.5}
    assert store.get(3, 3) == {3: 0.5}
    assert len(store) == 2 and store.num_entries == 3


def test_full_rows_evict_their_weakest_successor():
    store = TrigramStore(max_rows=4, max_row_entries=2)
    store.add(1, 1, 5, 0.9, 3.0)
    store.add(1, 1, 6, 0.1, 3.0)
    store.add(1, 1, 7, 0.3, 3.0)
    assert store.get(1, 1) == {5: 0.9, 7: 0.3}
    assert store.num_entries == 2


def test_drafter_memory_is_bounded():
    drafter = AdedDrafter(AdedConfig(max_rows=50, max_row_entries=4))
    tokens = [(i * 7919) % 1000 for i in range(2000)]
    drafter.propose([make_request(tokens)], [8])
    assert len(drafter.store) == 50
    assert 0 < drafter.state_bytes() <= 50 * 400 + 50 * 4 * 100


def test_corpus_rows_are_normalised_and_truncated():
    drafter = AdedDrafter(AdedConfig(top_k=2))
    drafter.add_corpus([[1, 2, 3, 1, 2, 3, 1, 2, 4], [9, 1, 2, 5]])
    # (1,2) -> 3 twice, 4 once, 5 once: probabilities 0.5, 0.25, 0.25; top-2 keeps 3 and 4 (tie -> lower id).
    assert drafter.store.get(1, 2) == {3: pytest.approx(0.5), 4: pytest.approx(0.25)}
    assert drafter.store.get(2, 3) == {1: pytest.approx(1.0)}
    assert drafter.store.get(9, 1) == {2: pytest.approx(1.0)}
    # Every untruncated row sums to one.
    for key, row in drafter.store.rows.items():
        if key != (1, 2):
            assert sum(row.values()) == pytest.approx(1.0)


# --- PUCT ---------------------------------------------------------------------------------


def node_with(children: list[tuple[float, int, float]], visits: int) -> Node:
    """A parent with children given as (prior, visits, value sum)."""
    parent = Node((0, 0), 0.0)
    parent.visits = visits
    for i, (prior, n, w) in enumerate(children):
        child = Node((0, i + 1), prior)
        child.visits, child.value = n, w
        parent.children.append(child)
    return parent


def test_unvisited_children_are_chosen_first():
    parent = node_with([(2.0, 10, 30.0), (0.01, 0, 0.0), (1.0, 5, 10.0)], visits=15)
    assert select_child(parent, 32.0, 8.0).state == (0, 2)


def test_with_equal_visits_the_higher_prior_wins():
    parent = node_with([(0.2, 4, 4.0), (0.7, 4, 4.0), (0.5, 4, 4.0)], visits=12)
    assert select_child(parent, 32.0, 8.0).state == (0, 2)


def test_puct_matches_a_hand_computation():
    # Q = 3/2 = 1.5; weight = 32 + ln((10 + 8 + 1) / 8) = 32 + ln(2.375) = 32.86500...;
    # exploration = 32.86500 * 0.5 * sqrt(10) / (1 + 2) = 32.86500 * 0.5 * 3.16228 / 3 = 17.32129...
    assert puct(10, 2, 3.0, 0.5, 32.0, 8.0) == pytest.approx(1.5 + 17.32129, abs=1e-4)
    assert puct(10, 2, 3.0, 0.5, 32.0, 8.0) == pytest.approx(1.5 + (32 + math.log(19 / 8)) * 0.5 * math.sqrt(10) / 3)
    assert puct(10, 0, 0.0, 0.5, 32.0, 8.0) == math.inf


# --- drafting -----------------------------------------------------------------------------


def test_repetitive_context_drafts_its_continuation():
    drafter = AdedDrafter()
    tree = drafter.propose([make_request([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3])], [16])[0]
    paths = root_paths(tree)
    assert (4, 1, 2) in paths
    assert (4, 1, 2, 3) in paths  # three search tokens plus the greedy one
    assert tree.parents[0] == ROOT and tree.tokens[0] == 4


@pytest.mark.parametrize("budget", [0, 1, 3, 16, 200])
def test_trees_respect_the_budget_and_are_well_formed(budget):
    tokens = [(i * i + 3 * i) % 11 for i in range(300)]  # a messy context with many branches
    drafter = AdedDrafter()
    tree = drafter.propose([make_request(tokens)], [budget])[0]
    if budget == 0:
        assert len(tree) == 0
    else:
        assert len(tree) > 0
    assert_well_formed(tree, min(budget, AdedConfig().max_nodes))


def test_budgets_are_per_request():
    tokens = [(i * i + 3 * i) % 11 for i in range(300)]
    drafter = AdedDrafter()
    trees = drafter.propose([make_request(tokens, "a"), make_request(tokens, "b")], [0, 5])
    assert len(trees[0]) == 0 and 0 < len(trees[1]) <= 5


def test_proposals_are_reproducible_for_the_same_request_state():
    # With the first release's c1 = 1.814 the rollouts matter (at c1 = 32 the priors dominate),
    # so the tree depends on the sampling stream: it must come from the request state alone.
    config = AdedConfig(c1=1.814)
    sampler = random.Random(3)
    tokens = [sampler.randrange(6) for _ in range(400)]  # six tokens: every row branches

    def propose(drafter: AdedDrafter, seed: int) -> tuple[list[int], list[int]]:
        tree = drafter.propose([make_request(tokens, seed=seed)], [16])[0]
        return tree.tokens, tree.parents

    assert len({str(propose(AdedDrafter(config), seed)) for seed in range(8)}) > 1  # the seed matters
    assert propose(AdedDrafter(config), 3) == propose(AdedDrafter(config), 3)
    drafter = AdedDrafter(config)
    first = propose(drafter, 3)
    assert propose(drafter, 3) == first  # no new token: the same state, the same tree


def test_state_is_shared_across_requests():
    teacher = [10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13]
    student = [50, 51, 52, 10, 11]  # (10, 11) never precedes anything in its own prompt
    cold = AdedDrafter().propose([make_request(student, "b")], [8])[0]
    assert len(cold) == 0
    drafter = AdedDrafter()
    drafter.propose([make_request(teacher, "a")], [8])
    warm = drafter.propose([make_request(student, "b")], [8])[0]
    assert (12, 13, 10) in root_paths(warm)


def test_release_drops_per_request_bookkeeping():
    drafter = AdedDrafter(AdedConfig(prompt_increment=0.5, increment=0.0))
    req = make_request([1, 2, 3])
    drafter.propose([req], [4])
    assert "r0" in drafter._seen_len
    assert drafter.store.get(1, 2) == {3: pytest.approx(0.5)}
    drafter.release(req)
    assert "r0" not in drafter._seen_len
    # Seen again (a new request reusing the id): its prompt counts again, the store is kept.
    drafter.propose([req], [4])
    assert drafter.store.get(1, 2) == {3: pytest.approx(1.0)}
    drafter.release(make_request([1], "never-seen"))  # releasing an unknown request is harmless


def test_short_context_gives_an_empty_tree():
    assert len(AdedDrafter().propose([make_request([42])], [8])[0]) == 0
