"""Lookahead (Zhao et al., "Lookahead: An Inference Acceleration Framework for Large Language
Model with Lossless Generation Accuracy", Ant Group, KDD 2024, arXiv 2312.12728).

State: a forest with one trie per key token. Every n-gram of text the engine has seen is stored
under its first token, its next `branch_length + 1` tokens as a path down that key's trie; a
node counts how often its path was inserted, separately per source: a global *output* count
(generated text, shared by every request) and a *context* count per request. A request's
context is its prompt and what it has generated so far, so it covers the chat history that
multi-turn prompts carry and the request's own repetitions — the copy source CopySpec
(Dumitru et al., 2025) speculates from.

Insertion: a request's prompt when it is first proposed for; its generated tokens as they are
committed, into its context counts and the output counts at once. An n-gram's window grows
as its tokens arrive (each token counted once per window), so text generated a step ago can
be copied at the next: on the first 40 HumanEval problems (`tandem bench replay`), counting
windows only once they were complete held SmolLM2-135M's tokens per decode step at 2.88 with
32-node trees (2.72 with 16), and growing windows into both counts gives 3.01 (2.83).

Retrieval: the last two tokens (the second is the draft's root) are looked up as key + one trie
level; with too few results the last token alone is tried. Under the matched node, nodes are
ranked by a mix of the two counts, (1 - w) * context + w * output with w = 1e-4, so the
request's own context dominates and what all requests generated breaks ties. Half the node
budget is kept for the nodes with the highest output count, the rest goes by the mix, and the
chosen sub-trie is laid out depth-first, best child first: a multi-branch draft tree.

Memory: when a request ends its context counts are removed, and nodes no one counts any more
are deleted at once. Output nodes are pruned as in the paper: every `squeeze_every` updated
tries, each of those over its node limits has its output counts halved, and nodes counted once
or less are deleted.

Storage is flat: nodes are integer ids into arrays; a node's children are its only child's id
(most nodes lie on single chains) or a dict of token -> id; a request's context counts are a
dict of id -> count. Millions of nodes then cost the garbage collector almost nothing (numbers,
and dicts of numbers, are not tracked), where one object per node would make every full
collection of the serving process walk them all; and a node costs about 100 bytes, not 300.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from services.runtime.request import Request
from services.spec.drafter import Drafter
from services.spec.tree import ROOT, DraftTree

NO_PARENT = -1  # a trie's root node: it stands for the key token and carries no counts
FREE = -2  # a deleted node id, waiting for reuse


@dataclass(frozen=True)
class LookaheadConfig:
    decoding_length: int = 64
    """Most draft nodes per proposal; the engine's per-request node budget can lower it."""
    branch_length: int = 16
    """Deepest draft path. N-grams are stored with branch_length + 1 tokens after their key,
    since a two-token query spends one trie level on its second token."""
    query_length: int = 2
    """Context tokens looked up, longest query first; the last of them is the draft's root."""
    output_weight: float = 1e-4
    """Weight of the global output count in the ranking (the request's context count gets the
    rest): the request's own context dominates; outputs break ties and fill in."""
    max_nodes: int = 65536
    """Per trie: more nodes than this make the trie due for pruning."""
    max_output_nodes: int = 512
    """Per trie: more nodes with an output count than this make the trie due for pruning."""
    squeeze_every: int = 1024
    """A release prunes the due tries once this many tries were updated since the last check."""

    def __post_init__(self) -> None:
        for name in ("decoding_length", "branch_length", "query_length", "max_nodes", "max_output_nodes",
                     "squeeze_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.output_weight <= 1.0:
            raise ValueError(f"output_weight must be in [0, 1], got {self.output_weight}")


@dataclass
class _Trie:
    root: int
    nodes: int = 0  # not counting the root
    output_nodes: int = 0  # nodes with a nonzero output count


@dataclass
class _RequestState:
    context: dict[int, int] = field(default_factory=dict)  # node -> count in this request's prompt and output
    pending: list[int] = field(default_factory=list)  # recent tokens whose output windows are incomplete
    ends: list[int] = field(default_factory=list)  # per pending token: the node its window reaches (NO_PARENT: none)
    grown: int = 0  # len(pending) when the windows last grew: each then held all of pending after it
    seen: int = 0  # len(req.token_ids) already taken in


class LookaheadDrafter(Drafter):
    name = "lookahead"

    def __init__(self, config: LookaheadConfig = LookaheadConfig()) -> None:
        self.config = config
        self.tries: dict[int, _Trie] = {}  # key token -> its trie
        # Per node id:
        self._children: list[int | dict[int, int] | None] = []  # the only child, or token -> child
        self._output = array("d")  # count in generated text, shared by every request
        self._holders = array("i")  # running requests whose context counts the node
        self._parent = array("i")  # parent id, NO_PARENT for a root, FREE for a deleted node
        self._token = array("i")  # the node's token (a root's is its key)
        self._free: list[int] = []
        self._requests: dict[str, _RequestState] = {}
        self._updated: set[int] = set()  # keys of tries updated since the last pruning check

    @property
    def num_nodes(self) -> int:
        """Nodes in the forest, roots not counted."""
        return sum(t.nodes for t in self.tries.values())

    def state_bytes(self) -> int:
        ids = len(self._parent)
        per_id = 8 + self._output.itemsize + self._holders.itemsize + self._parent.itemsize + self._token.itemsize
        # Measured: the parent's reference to a node (an int object, or a dict entry amortised
        # over the many single-child nodes) averages about 60 bytes.
        return ids * per_id + 60 * self.num_nodes

    # ---- the drafter interface

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        trees = []
        for req, budget in zip(reqs, budgets):
            state = self._requests.get(req.request_id)
            if state is None:
                state = self._requests[req.request_id] = self._start(req)
            self._take_outputs(req, state, final=False)
            budget = min(budget, self.config.decoding_length)
            trees.append(self._retrieve(req.token_ids, state.context, budget) if budget > 0 else DraftTree.empty())
        return trees

    def release(self, req: Request) -> None:
        state = self._requests.pop(req.request_id, None)
        if state is None:  # never proposed for (it ended at once): its outputs still teach
            n = req.num_prompt_tokens
            state = _RequestState(pending=req.token_ids[max(n - 1, 0):n], seen=n)
        self._take_outputs(req, state, final=True)
        self._forget_context(state.context)
        if len(self._updated) >= self.config.squeeze_every:
            for key in self._updated:
                trie = self.tries.get(key)
                if trie is not None and (trie.nodes > self.config.max_nodes
                                         or trie.output_nodes > self.config.max_output_nodes):
                    self._squeeze(key, trie)
            self._updated.clear()

    def counts(self, ngram: Sequence[int], request_id: str | None = None) -> tuple[float, float] | None:
        """(context count for request_id, output count) of the n-gram: the node at ngram[1:] in
        ngram[0]'s trie; None when it is not stored."""
        node = self._find(ngram)
        if node is None:
            return None
        state = self._requests.get(request_id) if request_id is not None else None
        return float(state.context.get(node, 0)) if state else 0.0, self._output[node]

    def _find(self, ngram: Sequence[int]) -> int | None:
        trie = self.tries.get(ngram[0]) if len(ngram) > 1 else None
        node = trie.root if trie is not None else None
        for token in ngram[1:]:
            node = self._child(node, token) if node is not None else None
        return node

    # ---- insertion

    def _start(self, req: Request) -> _RequestState:
        prompt = req.token_ids[:req.num_prompt_tokens]
        state = _RequestState(pending=prompt[-1:], seen=req.num_prompt_tokens)
        window = self.config.branch_length + 1
        for i in range(len(prompt) - 1):
            self._put(prompt[i], prompt[i + 1:i + 1 + window], state.context)
        # The last prompt token (in `pending`) keys the first output window, like the paper's
        # warm-up that keys each answer by the end-of-prompt token: a later prompt ending the
        # same way finds this answer.
        return state

    def _take_outputs(self, req: Request, state: _RequestState, final: bool) -> None:
        """Count the new output tokens: each window grows as its tokens arrive, so what was
        generated a step ago can already be copied. A window grows from the node it reached
        (the request's context holds it, so no pruning frees it meanwhile)."""
        tokens = req.token_ids
        if len(tokens) > state.seen:
            state.pending.extend(tokens[state.seen:])
            state.seen = len(tokens)
        window = self.config.branch_length + 1
        pending, ends = state.pending, state.ends
        ends.extend([NO_PARENT] * (len(pending) - len(ends)))
        for i in range(len(pending) - 1):
            have = min(window, max(state.grown - 1 - i, 0))
            want = min(window, len(pending) - 1 - i)
            if want > have:
                ends[i] = self._put(pending[i], pending[i + 1 + have:i + 1 + want], state.context,
                                    output=True, start=ends[i])
        done = len(pending) - 1 if final else max(len(pending) - window, 0)
        del pending[:done], ends[:done]
        state.grown = len(pending)

    def _put(self, key: int, branch: list[int], context: dict[int, int], output: bool = False,
             start: int = NO_PARENT) -> int:
        """Count the path `branch` under `key`'s trie, from its root or from node `start` (a
        window grown before): in a request's context counts, and with `output` in the output
        counts too. Returns the node the path ends at."""
        trie = self.tries.get(key)
        if trie is None:
            trie = self.tries[key] = _Trie(self._new_node(NO_PARENT, key))
        self._updated.add(key)
        counts, holders = self._output, self._holders  # locals: a hot loop
        node = trie.root if start == NO_PARENT else start
        for token in branch:
            child = self._child(node, token)
            if child is None:
                child = self._new_node(node, token)
                self._link(node, child)
                trie.nodes += 1
            if output:
                if not counts[child]:
                    trie.output_nodes += 1
                counts[child] += 1.0
            count = context.get(child, 0)
            if not count:
                holders[child] += 1
            context[child] = count + 1
            node = child
        return node

    def _new_node(self, parent: int, token: int) -> int:
        if self._free:
            node = self._free.pop()
            self._parent[node], self._token[node] = parent, token
            return node
        self._children.append(None)
        self._output.append(0.0)
        self._holders.append(0)
        self._parent.append(parent)
        self._token.append(token)
        return len(self._parent) - 1

    # ---- children: None, the only child's id, or a dict token -> id

    def _child(self, node: int, token: int) -> int | None:
        kids = self._children[node]
        if isinstance(kids, int):
            return kids if self._token[kids] == token else None
        return None if kids is None else kids.get(token)

    def _kids(self, node: int) -> Iterable[int]:
        kids = self._children[node]
        if isinstance(kids, int):
            return (kids,)
        return () if kids is None else kids.values()

    def _link(self, node: int, child: int) -> None:
        kids = self._children[node]
        if kids is None:
            self._children[node] = child
        elif isinstance(kids, int):
            self._children[node] = {self._token[kids]: kids, self._token[child]: child}
        else:
            kids[self._token[child]] = child

    def _unlink(self, node: int, child: int) -> None:
        kids = self._children[node]
        if isinstance(kids, int):
            self._children[node] = None
        elif kids is not None:
            del kids[self._token[child]]
            if len(kids) == 1:
                self._children[node] = next(iter(kids.values()))

    # ---- eviction

    def _forget_context(self, context: dict[int, int]) -> None:
        """Drop a finished request's context counts (the paper's branch eliminating), deleting at
        once the nodes nothing counts any more. Counts never grow down a path, and a context that
        holds a node holds its ancestors, so such a node's whole subtree is dead too; the dict
        lists ancestors first, so each dead subtree is cut at its top."""
        for node in context:
            self._holders[node] -= 1
        for node in context:
            if self._parent[node] != FREE and not self._holders[node] and not self._output[node]:
                key = self._key_of(node)
                self._cut(node, self.tries[key])
                self._drop_if_empty(key)

    def _squeeze(self, key: int, trie: _Trie) -> None:
        """The paper's node pruning: halve output counts above 1, delete the nodes at or below 1.
        Unlike the original, a node that a running request's context counts is kept (its output
        count cleared): deleting it would blind that request to its own context, and its release
        deletes it anyway."""
        stack = [trie.root]
        while stack:
            for child in list(self._kids(stack.pop())):
                if self._output[child] > 1.0:
                    self._output[child] *= 0.5
                elif self._holders[child]:
                    trie.output_nodes -= self._output[child] > 0
                    self._output[child] = 0.0
                else:
                    self._cut(child, trie)
                    continue
                stack.append(child)
        self._drop_if_empty(key)

    def _key_of(self, node: int) -> int:
        while self._parent[node] != NO_PARENT:
            node = self._parent[node]
        return self._token[node]

    def _cut(self, top: int, trie: _Trie) -> None:
        """Remove the subtree under `top` (not a root) from `trie` and free its ids."""
        self._unlink(self._parent[top], top)
        stack = [top]
        while stack:
            node = stack.pop()
            stack.extend(self._kids(node))
            trie.nodes -= 1
            trie.output_nodes -= self._output[node] > 0
            self._free_id(node)

    def _drop_if_empty(self, key: int) -> None:
        trie = self.tries[key]
        if self._children[trie.root] is None:
            self._free_id(trie.root)
            del self.tries[key]

    def _free_id(self, node: int) -> None:
        self._children[node] = None
        self._output[node] = 0.0
        self._holders[node] = 0
        self._parent[node] = FREE
        self._free.append(node)

    # ---- retrieval

    def _retrieve(self, tokens: list[int], context: dict[int, int], budget: int) -> DraftTree:
        cfg = self.config
        query = tokens[-cfg.query_length:]
        best = DraftTree.empty()
        for i in range(len(query)):
            trie = self.tries.get(query[i])
            if trie is None:
                continue
            node = self._match(trie.root, query[i + 1:], context)
            if node is None:
                continue
            tree = self._draft_under(node, context, budget)
            # A shorter query matches more text, so it usually finds a superset, ranked with less
            # context: it is asked only when the longer one found too little (as in the paper).
            if len(tree) >= len(best):
                best = tree
            if len(best) + 1 >= cfg.branch_length or len(best) >= budget:
                break
        return best

    def _match(self, node: int, path: list[int], context: dict[int, int]) -> int | None:
        """Walk `path` down from `node`. Other requests' context counts are invisible: each step
        needs this request's context count or an output count."""
        for token in path:
            child = self._child(node, token)
            if child is None or not (self._output[child] or child in context):
                return None
            node = child
        return node

    def _draft_under(self, start: int, context: dict[int, int], budget: int) -> DraftTree:
        w = self.config.output_weight
        output = self._output

        def mixed(node: int) -> float:
            return (1.0 - w) * context.get(node, 0) + w * output[node]

        chosen: set[int] = set()
        # Half the budget goes to the best-known outputs (the paper's min_output_size), so text
        # every request has produced competes with this request's own n-grams.
        self._best_first(start, budget // 2, chosen, lambda n: (output[n], mixed(n)))
        self._best_first(start, budget, chosen, lambda n: (mixed(n), output[n]))

        tokens: list[int] = []
        parents: list[int] = []

        def lay_out(node: int, parent: int) -> None:
            kids = [c for c in self._kids(node) if c in chosen]
            kids.sort(key=lambda c: (-mixed(c), -output[c]))  # stable: ties keep insertion order
            for child in kids:
                tokens.append(self._token[child])
                parents.append(parent)
                lay_out(child, len(tokens) - 1)

        lay_out(start, ROOT)
        return DraftTree(tokens, parents)

    def _best_first(self, start: int, limit: int, chosen: set[int],
                    rank: Callable[[int], tuple[float, float]]) -> None:
        """Grow `chosen` to `limit` nodes with the best-ranked nodes under `start`, at most
        branch_length deep. A node enters the frontier only once its parent is chosen, so the
        set stays a connected sub-trie; counts never grow down a path, so this finds the top
        nodes of the whole sub-trie while looking only at the frontier."""
        heap: list[tuple[float, float, int, int]] = []  # (-rank, -second rank, depth, node)

        def push_children(node: int, depth: int) -> None:
            for child in self._kids(node):
                first, second = rank(child)
                if first > 0:
                    heapq.heappush(heap, (-first, -second, depth, child))

        push_children(start, 1)
        while heap and len(chosen) < limit:
            _, _, depth, node = heapq.heappop(heap)
            chosen.add(node)
            if depth < self.config.branch_length:
                push_children(node, depth + 1)
