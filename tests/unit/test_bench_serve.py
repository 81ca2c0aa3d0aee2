"""How `tandem bench serve` splits a rate's prompts between the speculation modes."""

import random

from benchmarks.serve import deal_matched, round_order


def test_each_arrival_gets_a_prompt_of_about_the_same_length_in_every_mode():
    rng = random.Random(1)
    prompts = ["x" * rng.randint(50, 2000) + str(i) for i in range(3 * 40)]  # lengths all distinct
    dealt = deal_matched(prompts, 3, random.Random(0))

    assert [len(d) for d in dealt] == [40, 40, 40]
    assert sorted(p for d in dealt for p in d) == sorted(prompts)  # each prompt once, none lost
    rank = {p: i for i, p in enumerate(sorted(prompts, key=len))}
    longest = [0, 0, 0]
    for arrival in zip(*dealt):
        ranks = sorted(rank[p] for p in arrival)
        assert ranks == list(range(ranks[0], ranks[0] + 3)), "an arrival's prompts are neighbours in length"
        longest[max(range(3), key=lambda k: rank[arrival[k]])] += 1
    assert max(longest) - min(longest) <= 1, "no mode is always handed the longest of a group"
    # Length does not follow arrival order (sorted groups dealt as they are would send the
    # short prompts first, into the emptier server).
    ranks = [rank[p] for p in dealt[0]]
    assert ranks != sorted(ranks)


def test_rounds_alternate_the_order_of_the_modes():
    """A B C, C B A: a machine that slows steadily, or a server that runs its second segment
    slower, costs every mode the same over two rounds."""
    modes = ("off", "fixed", "auto")
    assert [round_order(modes, r) for r in range(3)] == [modes, ("auto", "fixed", "off"), modes]
