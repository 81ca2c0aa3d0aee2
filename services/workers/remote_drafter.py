"""A drafter that lives on a draft-pool worker, seen from the verify worker.

`propose` is one actor call per step for the whole batch (it waits: the trees are needed
now). Observations and releases are queued and sent with the next call, or by `flush()` at
the end of the step without waiting — Ray runs one caller's calls to an actor in order, so
the draft worker always sees a request's history in sequence.

Losing the draft worker costs speed, never tokens: proposals then come back empty and the
verify worker decodes plainly (verification decides every token either way).

PEARL (Liu et al., "Parallel Speculative Decoding with Adaptive Draft Length") keeps the two
pools busy at once, in two halves:
- post-verify: once a step's trees are chosen, the draft worker is asked at once — without
  waiting — to draft the *next* step from the optimistic assumption that each tree's main
  path will be accepted. It drafts while the target verifies. At the next step, a request
  whose main path was accepted whole, and whose bonus token is one of the look-ahead tree's
  first tokens, takes that token's subtree as its draft with no drafting left to wait for;
  the draft worker rewinds what it assumed for the others.
- pre-verify: a request with no usable look-ahead is not made to wait for its draft either.
  It is drafted for from where it stands while the target decodes it plainly this step (the
  target checks the draft's first token, so to speak, before the rest exists); at the next
  step it takes the subtree under the token that step committed, as above.
So the verify worker waits on drafting only when a draft is slower than a whole verify step.
Only drafters that can be rewound (`Drafter.drafts_ahead`) draft ahead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import RayActorError

from services.runtime.request import Request
from services.spec.acceptance import Acceptance
from services.spec.drafter import Drafter, TopCandidates, top_candidates
from services.spec.tree import ROOT, DraftTree
from services.workers.draft_messages import ObserveItem, ProposeItem, ReleaseItem, RequestSync
from services.workers.tracing import current_carrier

log = logging.getLogger(__name__)


@dataclass
class DraftStats:
    steps: int = 0  # propose calls
    drafted: int = 0  # requests drafted for
    ahead_used: int = 0  # of them, drafts taken from the look-ahead (no wait on drafting)
    ahead_missed: int = 0  # look-ahead drafts made but not usable (the main path was cut short)
    pre_verified: int = 0  # requests decoded plainly while their draft was made (pre-verify)
    wait_seconds: float = 0.0  # time the verify worker spent waiting for drafts


@dataclass
class _Ahead:
    ref: ray.ObjectRef  # -> list[DraftTree], one per request of `chains`, in its order
    base: dict[str, int]  # request id -> its token count when the look-ahead was asked for
    chains: dict[str, list[int]]  # request id -> the main path assumed accepted


class RemoteDrafter(Drafter):
    name = "remote"

    def __init__(self, handle: ray.actor.ActorHandle, drafter_name: str, observed_candidates: int,
                 draft_ahead: bool = False, pre_verify: bool = False) -> None:
        self.handle = handle
        self.drafter_name = drafter_name
        self.observed_candidates = observed_candidates
        self.draft_ahead = draft_ahead
        self.pre_verify = pre_verify and draft_ahead
        self._synced: dict[str, int] = {}  # request id -> tokens the draft worker has
        self._budgets: dict[str, int] = {}  # request id -> its node budget at the last proposal
        self._queue: list[ObserveItem | ReleaseItem] = []
        self._ahead: list[_Ahead] = []  # look-aheads asked for at the last step, oldest first
        self.stats = DraftStats()
        self.lost: str | None = None  # why the draft worker is gone, once it is

    @property
    def drafts_in_flight(self) -> bool:
        return bool(self._ahead)

    def _sync(self, req: Request) -> RequestSync:
        known = self._synced.get(req.request_id, 0)
        self._synced[req.request_id] = len(req.token_ids)
        return RequestSync(req.request_id, known, req.token_ids[known:], req.num_prompt_tokens, req.params,
                           req.seed)

    def propose(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[DraftTree]:
        if self.lost is not None:
            return [DraftTree.empty() for _ in reqs]
        started = time.perf_counter()
        self.stats.steps += 1
        self.stats.drafted += sum(b > 0 for b in budgets)
        self._budgets = {r.request_id: b for r, b in zip(reqs, budgets)}
        trees: list[DraftTree | None] = [None] * len(reqs)
        try:
            self._take_ahead(reqs, budgets, trees)
            todo = [i for i, t in enumerate(trees) if t is None and budgets[i] > 0]
            if todo:
                items = [ProposeItem(self._sync(reqs[i]), budgets[i]) for i in todo]
                queued, self._queue = self._queue, []
                ref = self.handle.propose.remote(queued, items, trace=current_carrier())
                if self.pre_verify:  # decode these plainly while their drafts are made
                    self._ahead.append(_Ahead(ref, {reqs[i].request_id: reqs[i].num_tokens for i in todo},
                                              {reqs[i].request_id: [] for i in todo}))
                    self.stats.pre_verified += len(todo)
                else:
                    for i, tree in zip(todo, ray.get(ref)):
                        trees[i] = tree
        except RayActorError as e:
            self.lost = f"draft worker lost: {e}"
            log.warning("%s; decoding without drafts from now on", self.lost)
            return [DraftTree.empty() for _ in reqs]
        finally:
            self.stats.wait_seconds += time.perf_counter() - started
        return [t if t is not None else DraftTree.empty() for t in trees]

    def _take_ahead(self, reqs: Sequence[Request], budgets: Sequence[int], trees: list[DraftTree | None]) -> None:
        """Fill trees[i] from the look-aheads where their assumptions held (see the module doc)."""
        pending, self._ahead = self._ahead, []
        for ahead in pending:
            self._take_one(ahead, reqs, budgets, trees)

    def _take_one(self, ahead: _Ahead, reqs: Sequence[Request], budgets: Sequence[int],
                  trees: list[DraftTree | None]) -> None:
        position = {rid: j for j, rid in enumerate(ahead.chains)}
        usable = {}
        for i, req in enumerate(reqs):
            rid = req.request_id
            if rid not in ahead.chains or budgets[i] <= 0 or trees[i] is not None:
                continue
            base, chain = ahead.base[rid], ahead.chains[rid]
            if req.num_tokens == base + len(chain) + 1 and req.token_ids[base:base + len(chain)] == chain:
                usable[i] = position[rid]
        self.stats.ahead_missed += len(ahead.chains) - len(usable)
        if not usable:
            return  # never wait for a look-ahead nobody can use; the draft worker rewinds it
        looked_ahead = ray.get(ahead.ref)
        bonus_of = {i: reqs[i].token_ids[-1] for i in usable}
        for i, j in usable.items():
            tree = looked_ahead[j]
            first = [n for n in tree.children.get(ROOT, []) if tree.tokens[n] == bonus_of[i]]
            if not first:
                self.stats.ahead_missed += 1
                continue
            sub = tree.subtree(first[0])
            if len(sub) > budgets[i]:
                sub = sub.pruned(budgets[i])
            self._synced[reqs[i].request_id] = reqs[i].num_tokens - 1  # the draft worker has all but the bonus
            trees[i] = sub
            self.stats.ahead_used += 1

    def verifying(self, reqs: Sequence[Request], trees: Sequence[DraftTree]) -> None:
        """PEARL post-verify: ask for the next step's drafts now, assuming each main path holds."""
        if not self.draft_ahead or self.lost is not None:
            return
        chosen = [(r, t) for r, t in zip(reqs, trees) if len(t)]
        if not chosen:
            return
        items, chains = [], {}
        for req, tree in chosen:
            chains[req.request_id] = [tree.tokens[n] for n in tree.main_path()]
            items.append(ProposeItem(self._sync(req), self._budgets.get(req.request_id, len(tree))))
        queued, self._queue = self._queue, []
        ref = self.handle.propose_ahead.remote(queued, items, list(chains.values()), trace=current_carrier())
        self._ahead.append(_Ahead(ref, {r.request_id: r.num_tokens for r, _ in chosen}, chains))

    def observe(self, req: Request, tree: DraftTree, logits: torch.Tensor | TopCandidates,
                result: Acceptance) -> None:
        k = self.observed_candidates
        candidates = TopCandidates(top_candidates(logits, k)) if k else None
        self._queue.append(ObserveItem(self._sync(req), tree, candidates, result))

    def release(self, req: Request) -> None:
        self._budgets.pop(req.request_id, None)
        if self._synced.pop(req.request_id, None) is not None:
            self._queue.append(ReleaseItem(req.request_id))

    def flush(self) -> None:
        """Send what is queued without waiting for it."""
        if self._queue and self.lost is None:
            queued, self._queue = self._queue, []
            self.handle.apply.remote(queued)
