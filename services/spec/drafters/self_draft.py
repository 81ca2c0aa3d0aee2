"""`self-draft`: the target drafts for itself with a subset of its sublayers (SWIFT, Xia et al.,
"SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration", ICLR 2025).

The draft is the target with a set of attention and MLP sublayers skipped (identity on the
residual; a skipped attention writes no KV). Never the first or last layer; `skip_ratio` of
the 2 (L - 2) candidate sublayers are skipped. The draft reads the target's exact KV for the
committed prefix and writes its own KV only into the request's slots past the committed
tokens, which the verify pass overwrites — so no second cache exists.

The skip set is chosen on the fly and kept across requests (SWIFT optimises for a stream of
requests). Each new request pays at most `trials_per_request` candidate evaluations until
the search stops: a candidate is scored by its "matchness", the fraction of positions in a
window of the prompt where the draft's argmax equals the target's (read from the prefill's
logits), computed by one teacher-forced draft pass on scratch blocks. Candidates come from
random search, with a Gaussian-process UCB proposal every `bayes_interval`-th trial;
hill climbing keeps the best. The search stops for good when the best matchness reaches
`target_matchness`, after `patience` trials without improvement, or after `max_trials`.

Trees grow as in model_draft.py (DySpec with the SpecDec++ stop), which also gives SWIFT's
confidence-aware early stopping.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.runtime.block_manager import BlockManager
from services.runtime.loader import LoadedModel
from services.runtime.model.llama import LayerPlan
from services.runtime.model_runner import ModelRunner, SeqInput
from services.runtime.request import Request
from services.spec.drafters.draft_model import DraftModelDrafter
from services.spec.drafters.model_draft import ModelDraftConfig, ModelDrafter, _Growing, parallel_groups


@dataclass(frozen=True)
class SelfDraftConfig:
    skip_ratio: float = 0.45
    """Share of the 2 (L - 2) candidate sublayers skipped."""
    window: int = 32
    """Prompt positions a candidate is scored on."""
    trials_per_request: int = 4
    """Most candidate evaluations a request pays for while the search runs."""
    max_trials: int = 120
    patience: int = 40
    """Trials without improvement before the search stops."""
    target_matchness: float = 0.9
    bayes_interval: int = 5
    """Every n-th candidate is the Gaussian process's UCB pick; the others are random."""
    seed: int = 0


@dataclass
class LayerSkipSearch:
    """SWIFT's layer-set optimisation: random search + GP-UCB, hill climbing on matchness."""

    num_layers: int
    config: SelfDraftConfig = field(default_factory=SelfDraftConfig)

    def __post_init__(self) -> None:
        self.candidates = [(kind, i) for i in range(1, self.num_layers - 1) for kind in ("attn", "mlp")]
        self.num_skip = int(len(self.candidates) * self.config.skip_ratio)
        self.rng = random.Random(self.config.seed)
        odd = [c for c in self.candidates if c[1] % 2 == 1]  # SWIFT starts from every odd layer
        self.best = frozenset((odd + [c for c in self.candidates if c not in odd])[:self.num_skip])
        self.best_score = -1.0
        self.trials = 0
        self.since_improvement = 0
        self.history: list[tuple[np.ndarray, float]] = []
        self.done = self.num_skip == 0

    def plan(self, skipped: frozenset[tuple[str, int]] | None = None, group: int = 1) -> LayerPlan:
        skipped = self.best if skipped is None else skipped
        attn = frozenset(i for kind, i in skipped if kind == "attn")
        mlp = frozenset(i for kind, i in skipped if kind == "mlp")
        return LayerPlan(skip_attention=attn, skip_mlp=mlp, parallel_groups=parallel_groups(self.num_layers, group))

    def next_candidate(self) -> frozenset[tuple[str, int]]:
        if self.trials == 0:
            return self.best
        if self.trials % self.config.bayes_interval == 0 and len(self.history) >= 3:
            return self._ucb_pick()
        return frozenset(self.rng.sample(self.candidates, self.num_skip))

    def record(self, skipped: frozenset[tuple[str, int]], score: float) -> None:
        self.trials += 1
        self.history.append((self._encode(skipped), score))
        if score > self.best_score:
            self.best, self.best_score, self.since_improvement = skipped, score, 0
        else:
            self.since_improvement += 1
        c = self.config
        if self.best_score >= c.target_matchness or self.since_improvement >= c.patience or self.trials >= c.max_trials:
            self.done = True

    def _encode(self, skipped: frozenset[tuple[str, int]]) -> np.ndarray:
        return np.array([1.0 if c in skipped else 0.0 for c in self.candidates])

    def _ucb_pick(self, pool: int = 256, kappa: float = 2.5, noise: float = 1e-2) -> frozenset[tuple[str, int]]:
        """Fit a GP (RBF kernel) to the scores so far; among random points of [0, 1]^d pick the
        best upper confidence bound and skip its num_skip largest coordinates."""
        x = np.stack([h[0] for h in self.history])
        y = np.array([h[1] for h in self.history])
        y_mean = y.mean()
        length = math.sqrt(x.shape[1]) / 2

        def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
            return np.exp(-d2 / (2 * length**2))

        k_inv = np.linalg.inv(kernel(x, x) + noise * np.eye(len(x)))
        points = np.array([[self.rng.random() for _ in self.candidates] for _ in range(pool)])
        ks = kernel(points, x)
        mu = y_mean + ks @ k_inv @ (y - y_mean)
        var = np.clip(1.0 - np.einsum("ij,jk,ik->i", ks, k_inv, ks), 1e-12, None)
        best = points[int(np.argmax(mu + kappa * np.sqrt(var)))]
        top = np.argsort(-best)[:self.num_skip]
        return frozenset(self.candidates[i] for i in top)


class _SkipSearching:
    """The on-the-fly layer-skip search, shared by the self-draft over the target's own cache
    and the one over a copy of the target on a draft worker. Hosts provide `search`,
    `_runner`, `blocks`, `config`, `_plan` and `_table(req)` (the request's block table holding
    the target's exact KV for its prompt)."""

    def _start_search(self, num_layers: int, search: SelfDraftConfig) -> None:
        self.search = LayerSkipSearch(num_layers, search)
        self._plan = self.search.plan(group=self.config.parallel_group)
        self.prompt_targets: dict[str, dict[int, int]] = {}  # request -> position -> target argmax there
        self.trials_paid: dict[str, int] = {}

    def _record_prompt_targets(self, req: Request, start: int, logits: torch.Tensor) -> None:
        """Row i of `logits` is the target's at position start + i; prompt positions only."""
        if self.search.done:
            return
        targets = self.prompt_targets.setdefault(req.request_id, {})
        for offset, t in enumerate(logits[:max(0, req.num_prompt_tokens - start)].argmax(-1).tolist()):
            targets[start + offset] = t

    def _search_step(self, req: Request) -> None:
        """Spend up to trials_per_request candidate evaluations on this request's prompt."""
        targets = self.prompt_targets.get(req.request_id)
        if self.search.done or not targets:
            return
        while not self.search.done and self.trials_paid.get(req.request_id, 0) < self.search.config.trials_per_request:
            candidate = self.search.next_candidate()
            score = self._matchness(req, targets, candidate)
            if score is None:
                return
            self.search.record(candidate, score)
            self.trials_paid[req.request_id] = self.trials_paid.get(req.request_id, 0) + 1
        self._plan = self.search.plan(group=self.config.parallel_group)
        if self.search.done:
            self.prompt_targets.clear()

    def _matchness(self, req: Request, targets: dict[int, int], skipped: frozenset) -> float | None:
        """Teacher-forced draft pass over the prompt's last window, on scratch blocks: the share of
        positions where the draft's argmax equals the target's."""
        bs = self.blocks.block_size
        prompt_end = req.num_prompt_tokens
        start = max(bs, (prompt_end - self.search.config.window) // bs * bs)  # block-aligned, keeps a prefix
        if start >= prompt_end - 1 or any(p not in targets for p in range(start, prompt_end)):
            return None
        scratch: list[int] = []
        if not self.blocks.allocate(scratch, prompt_end - start):
            return None
        try:
            table = list(self._table(req)[:start // bs]) + scratch  # the shared prefix is only read
            out = self._runner.forward([SeqInput(req.token_ids[start:prompt_end], start, table, logits="all")],
                                       plan=self.search.plan(skipped))
        finally:
            self.blocks.free(scratch)
        draft = out.logits[0].argmax(-1).tolist()
        want = [targets[p] for p in range(start, prompt_end)]
        return sum(a == b for a, b in zip(draft, want)) / len(want)

    def _forget_search(self, req: Request) -> None:
        self.prompt_targets.pop(req.request_id, None)
        self.trials_paid.pop(req.request_id, None)


class SelfDrafter(_SkipSearching, ModelDrafter):
    name = "self-draft"
    wants_prompt_logits = True

    def __init__(self, runner: ModelRunner, block_manager: BlockManager, config: ModelDraftConfig = ModelDraftConfig(),
                 search: SelfDraftConfig = SelfDraftConfig()) -> None:
        super().__init__(config)
        self._runner = runner
        self.blocks = block_manager
        self._start_search(runner.model.config.num_hidden_layers, search)

    def _table(self, req: Request) -> Sequence[int]:
        return req.block_table

    def observe_prompt(self, req: Request, start: int, token_ids: Sequence[int], logits: torch.Tensor) -> None:
        self._record_prompt_targets(req, start, logits)

    def _begin(self, reqs: Sequence[Request], budgets: Sequence[int]) -> list[tuple[_Growing, torch.Tensor] | None]:
        for req in reqs:
            self._search_step(req)
        chosen = []
        for req, budget in zip(reqs, budgets):
            # The draft writes into the request's own slots past its committed tokens.
            if budget > 0 and self.blocks.allocate(req.block_table, len(req.token_ids) + budget):
                chosen.append((req, budget))
        if not chosen:
            return [None] * len(reqs)
        root = [SeqInput([r.token_ids[-1]], len(r.token_ids) - 1, r.block_table) for r, _ in chosen]
        out = self._runner.forward(root, plan=self._plan)
        self.passes += 1
        started = {id(r): (_Growing(r, b, r.block_table, root_slot=len(r.token_ids) - 1), lg[-1])
                   for (r, b), lg in zip(chosen, out.logits)}
        return [started.get(id(r)) for r in reqs]

    def release(self, req: Request) -> None:
        self._forget_search(req)


class CopiedTargetSelfDrafter(_SkipSearching, DraftModelDrafter):
    """`self-draft` on a draft worker: the same SWIFT draft — the target minus a searched set of
    sublayers — over a copy of the target's weights and the worker's own paged cache. Its
    catch-up pass runs every layer, so that cache holds the target's exact KV for the committed
    tokens, as the verify worker's does, and the prompt's logits from that pass are the
    target's own: what the layer-skip search scores its candidates against. Catching up costs
    the draft worker a target forward over the newly committed tokens each step — work that
    PEARL overlaps with verification."""

    name = "self-draft"

    def __init__(self, target: LoadedModel, config: ModelDraftConfig = ModelDraftConfig(),
                 search: SelfDraftConfig = SelfDraftConfig(), num_kv_blocks: int = 1024) -> None:
        super().__init__(target, target.config.vocab_size, config, num_kv_blocks=num_kv_blocks)
        self._start_search(target.config.num_hidden_layers, search)

    def _table(self, req: Request) -> Sequence[int]:
        return self.seqs[req.request_id].table

    def _catch_up_logits(self, seq_computed: int, req: Request) -> str:
        return "all" if not self.search.done and seq_computed < req.num_prompt_tokens else "last"

    def _caught_up(self, req: Request, start: int, logits: torch.Tensor) -> None:
        if len(logits) > 1:
            self._record_prompt_targets(req, start, logits)
            self._search_step(req)

    def release(self, req: Request) -> None:
        self._forget_search(req)
        super().release(req)
