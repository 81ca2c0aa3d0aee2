"""ADED (Liu, Lei, Zhang, Xu, "Adaptive Draft-Verification for Efficient Large Language Model
Decoding", AAAI 2025, arXiv 2407.12021).

State: a tri-gram store, (a, b) -> {c: weight}, standing in for the target model. One store
per drafter (one per engine), kept across requests ("hot start"): the more it is used, the
better it predicts. It holds token ids only, never text.
- No offline corpus ships with this project, so a request's prompt trigrams are added when it
  is first seen (`add_corpus` can still load row-normalised corpus counts).
- Adaptation: before each draft, every trigram inside the last `window` committed tokens
  gains `increment`, capped at `cap`. Weights are never renormalised or decayed, so they are
  scores, not probabilities, and a recent n-gram is boosted on each step it stays in the window.
- Memory: at most `max_rows` rows of at most `max_row_entries` successors; the least
  recently updated row goes first, and inside a full row the weakest successor.

Drafting is an MCTS-style search whose states are bigrams. The root is the last two
committed tokens; a child appends one successor c of its parent state (a, b), moving to
(b, c), with prior T[(a, b)][c]. Each of `iterations` rounds selects by PUCT, expands a leaf
with all of its successors, rolls out by sampling successors in proportion to their weight
until the state path is `path_length` long, and backs up the reward 1 + (sum of the weights
along the path). The most visited node paths, each extended by one greedy token, are merged
into a token trie. Deviations from the authors' code, and why, are noted where they occur.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.runtime.request import Request
from services.spec.drafter import Drafter
from services.spec.tree import ROOT, DraftTree

Bigram = tuple[int, int]

# Rough CPython sizes, for state_bytes: a row (key tuple, dict, LRU links) and one successor entry.
_ROW_BYTES = 400
_ENTRY_BYTES = 100


@dataclass(frozen=True)
class AdedConfig:
    window: int = 16
    """The online update covers the trigrams inside the last `window` committed tokens."""
    increment: float = 0.04
    """Weight a trigram gains per draft call while it is inside the window."""
    cap: float = 3.0
    """No weight grows past this."""
    prompt_increment: float = 0.04
    """Weight each prompt trigram occurrence adds when a request is first seen (the stand-in
    for the corpus the paper builds offline; not in the authors' code)."""
    top_k: int = 12
    """Successors per row read as priors (and kept per row by `add_corpus`)."""
    iterations: int = 150
    """Search rounds per draft call."""
    path_length: int = 4
    """Bigram states per search path, the root's included: at most path_length - 1 tree tokens."""
    top_paths: int = 24
    """Most visited node paths turned into draft paths."""
    c1: float = 32.0
    """PUCT base exploration weight (the first release used 1.814)."""
    c2: float = 8.0
    """PUCT visit scale of the log-growing part of the exploration weight."""
    max_nodes: int = 64
    """Largest tree proposed, whatever the engine's budget."""
    max_rows: int = 200_000
    """Rows kept; past it the least recently updated row is evicted."""
    max_row_entries: int = 32
    """Successors kept per row; past it the lowest-weight successor is evicted."""

    def __post_init__(self) -> None:
        if self.path_length < 2:
            raise ValueError(f"path_length must be >= 2 (the root and one token), got {self.path_length}")
        if self.top_k < 1 or self.max_rows < 1 or self.max_row_entries < 1:
            raise ValueError("top_k, max_rows and max_row_entries must be >= 1")


class TrigramStore:
    """(a, b) -> {c: weight}, bounded in rows and in successors per row."""

    def __init__(self, max_rows: int, max_row_entries: int) -> None:
        self.max_rows = max_rows
        self.max_row_entries = max_row_entries
        self.rows: OrderedDict[Bigram, dict[int, float]] = OrderedDict()  # least recently updated first
        self.num_entries = 0

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, a: int, b: int) -> dict[int, float] | None:
        return self.rows.get((a, b))

    def add(self, a: int, b: int, c: int, amount: float, cap: float) -> None:
        key = (a, b)
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.max_rows:
                _, evicted = self.rows.popitem(last=False)
                self.num_entries -= len(evicted)
            row = self.rows[key] = {}
        else:
            self.rows.move_to_end(key)
        if c not in row:
            if len(row) >= self.max_row_entries:
                del row[min(row, key=row.__getitem__)]
                self.num_entries -= 1
            row[c] = 0.0
            self.num_entries += 1
        row[c] = min(row[c] + amount, cap)

    def add_trigrams(self, tokens: Sequence[int], amount: float, cap: float) -> None:
        """Each trigram occurrence in `tokens` adds `amount`."""
        for i in range(len(tokens) - 2):
            self.add(tokens[i], tokens[i + 1], tokens[i + 2], amount, cap)

    def top(self, a: int, b: int, k: int) -> list[tuple[int, float]]:
        """The row's k heaviest successors, heaviest first (ties: lower token id first)."""
        row = self.rows.get((a, b))
        if not row:
            return []
        return sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class Node:
    __slots__ = ("state", "prior", "visits", "value", "children", "expanded")

    def __init__(self, state: Bigram, prior: float) -> None:
        self.state = state
        self.prior = prior
        self.visits = 0
        self.value = 0.0  # sum of backed-up rewards
        self.children: list[Node] = []  # heaviest prior first, so ties go to the likelier token
        self.expanded = False


def puct(parent_visits: int, visits: int, value: float, prior: float, c1: float, c2: float) -> float:
    """MuZero-style PUCT with a log-growing exploration weight; unvisited children come first."""
    if visits == 0:
        return math.inf
    explore = (c1 + math.log((parent_visits + c2 + 1) / c2)) * prior * math.sqrt(parent_visits) / (1 + visits)
    return value / visits + explore


def select_child(node: Node, c1: float, c2: float) -> Node:
    """The child with the highest PUCT score; the first one on ties."""
    best = node.children[0]
    best_score = -math.inf
    for child in node.children:
        score = puct(node.visits, child.visits, child.value, child.prior, c1, c2)
        if score > best_score:
            best, best_score = child, score
    return best


class AdedDrafter(Drafter):
    name = "aded"

    def __init__(self, config: AdedConfig = AdedConfig()) -> None:
        self.config = config
        self.store = TrigramStore(config.max_rows, config.max_row_entries)
        self._seen_len: dict[str, int] = {}  # request id -> committed length at its last update

    def state_bytes(self) -> int:
        return len(self.store) * _ROW_BYTES + self.store.num_entries * _ENTRY_BYTES

    def add_corpus(self, sequences: Iterable[Sequence[int]]) -> None:
        """Load token-id sequences as the offline datastore: count trigrams, normalise each row
        to probabilities, keep its `top_k` most likely successors (not renormalised, as in the
        authors' loader) and add them to the store, on top of any weights already there.
        The store's row limit applies: a corpus larger than `max_rows` keeps its last rows."""
        counts: dict[Bigram, dict[int, int]] = {}
        for seq in sequences:
            for i in range(len(seq) - 2):
                row = counts.setdefault((seq[i], seq[i + 1]), {})
                row[seq[i + 2]] = row.get(seq[i + 2], 0) + 1
        cfg = self.config
        for (a, b), row in counts.items():
            total = sum(row.values())
            kept = sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))[:cfg.top_k]
            for c, n in kept:
                self.store.add(a, b, c, n / total, cfg.cap)

    def release(self, req: Request) -> None:
        self._seen_len.pop(req.request_id, None)

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        trees = []
        for req, budget in zip(reqs, budgets):
            self._learn(req)
            limit = min(budget, self.config.max_nodes)
            if limit <= 0 or len(req.token_ids) < 2:
                trees.append(DraftTree.empty())
                continue
            rng = random.Random((req.seed << 32) ^ len(req.token_ids))  # reproducible per request state
            paths = self._search(req.token_ids[-2], req.token_ids[-1], rng)
            trees.append(build_trie(paths, limit))
        return trees

    def _learn(self, req: Request) -> None:
        cfg = self.config
        tokens = req.token_ids
        last = self._seen_len.get(req.request_id)
        if last is None:
            self.store.add_trigrams(tokens[:req.num_prompt_tokens], cfg.prompt_increment, cfg.cap)
        # The authors update on every draft call; skipping a call that sees no new token makes
        # a repeated proposal for the same state identical and never double-counts a step.
        if last != len(tokens):
            self.store.add_trigrams(tokens[-cfg.window:], cfg.increment, cfg.cap)
            self._seen_len[req.request_id] = len(tokens)

    def _search(self, prev: int, cur: int, rng: random.Random) -> list[list[int]]:
        """Run the search from state (prev, cur); the most visited node paths, each extended
        by its greedy successor, de-duplicated, most visited first."""
        cfg = self.config
        store = self.store
        rows: dict[Bigram, list[tuple[int, float]]] = {}  # the store does not change during a search

        def successors(state: Bigram) -> list[tuple[int, float]]:
            row = rows.get(state)
            if row is None:
                row = rows[state] = store.top(state[0], state[1], cfg.top_k)
            return row

        root = Node((prev, cur), 0.0)
        if not successors(root.state):
            return []
        for _ in range(cfg.iterations):
            node = root
            path = [root]
            reward = 1.0
            while node.children and len(path) < cfg.path_length:
                node = select_child(node, cfg.c1, cfg.c2)
                path.append(node)
                reward += node.prior
            if not node.expanded and len(path) < cfg.path_length:
                node.expanded = True
                b = node.state[1]
                node.children = [Node((b, c), w) for c, w in successors(node.state)]
                if node.children:
                    # All children are unvisited, so this is the heaviest one. (The authors' code
                    # takes the last child created, an artefact of hash-map order.)
                    node = select_child(node, cfg.c1, cfg.c2)
                    path.append(node)
                    reward += node.prior
            state = node.state
            depth = len(path)
            while depth < cfg.path_length:
                row = successors(state)
                if not row:
                    break
                c, w = rng.choices(row, weights=[w for _, w in row])[0]
                reward += w
                state = (state[1], c)
                depth += 1
            for n in path:
                n.visits += 1
                n.value += reward

        ranked: list[tuple[int, list[int], Bigram]] = []  # (visits, tokens, last state), depth-first order
        stack: list[tuple[Node, list[int]]] = [(child, []) for child in reversed(root.children)]
        while stack:
            node, prefix = stack.pop()
            tokens = prefix + [node.state[1]]
            ranked.append((node.visits, tokens, node.state))
            stack.extend((child, tokens) for child in reversed(node.children))
        ranked.sort(key=lambda r: -r[0])  # stable: depth-first order breaks ties

        paths: list[list[int]] = []
        seen: set[tuple[int, ...]] = set()
        for visits, tokens, state in ranked[:cfg.top_paths]:
            if visits == 0:
                break
            greedy = successors(state)
            full = tokens + [greedy[0][0]] if greedy else tokens
            if tuple(full) not in seen:
                seen.add(tuple(full))
                paths.append(full)
        return paths


def build_trie(paths: Sequence[Sequence[int]], limit: int) -> DraftTree:
    """Merge token paths into a parents-first trie of at most `limit` nodes. Paths go in
    order, so the most visited come first and a cut keeps a prefix of the last one. (The
    authors instead drop the paths with the most distinct tokens until a 64-token budget
    fits, which would discard exactly the long paths under this engine's small budgets.)"""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for path in paths:
        parent = ROOT
        for token in path:
            node = index.get((parent, token))
            if node is None:
                if len(tokens) >= limit:
                    return DraftTree(tokens, parents)
                node = index[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            parent = node
    return DraftTree(tokens, parents)
