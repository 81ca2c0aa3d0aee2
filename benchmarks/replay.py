"""`tandem bench replay`: how many tokens per verify step a drafter's trees would accept, measured
without running the model, by replaying plain greedy decoding's outputs through the drafter.

Greedy verification accepts the longest root path whose tokens are the target's next tokens,
so against a known greedy continuation a tree's acceptance is exact, not estimated. For a
drafter that learns from tokens only (no logits: ngram, ADED, lookahead), proposing,
accepting and committing step by step against the reference reproduces what the engine does
with goodput control off (every step verifies the drafter's tree, up to a node budget) — and
takes a second instead of minutes, so drafter changes can be compared at several budgets at
once. The reference outputs come from the engine itself (plain decoding, all prompts batched).

MAT here is as in `bench spec`: tokens committed per decode step, the bonus included, the
prompt's first token (from prefill) not counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.engine import environment
from benchmarks.prompts import from_jsonl, humaneval
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.errors import InvalidRequestError
from services.runtime.loader import load_model
from services.runtime.registry import DEFAULT_MODEL
from services.runtime.request import Request
from services.runtime.sampling_params import SamplingParams
from services.spec.acceptance import Acceptance
from services.spec.config import SpecConfig
from services.spec.drafter import DraftContext, Drafter
from services.spec.registry import make_drafter
from services.spec.tree import ROOT, DraftTree


@dataclass(frozen=True)
class ReplayBenchConfig:
    model: str = DEFAULT_MODEL
    prompts: str = "humaneval"
    drafters: tuple[str, ...] = ("ngram", "aded", "lookahead")
    budgets: tuple[int, ...] = (8, 16, 32)
    max_new_tokens: int = 128
    limit: int | None = 40


def accepted_path(tree: DraftTree, truth: Sequence[int]) -> list[int]:
    """Node indices of the longest root path spelling a prefix of `truth`."""
    path: list[int] = []
    node = ROOT
    while len(path) < len(truth):
        node = next((c for c in tree.children.get(node, []) if tree.tokens[c] == truth[len(path)]), None)
        if node is None:
            break
        path.append(node)
    return path


def replay(drafter: Drafter, prompts: Sequence[list[int]], outputs: Sequence[list[int]], budget: int,
           max_new_tokens: int) -> dict:
    """Drive `drafter` over each (prompt, greedy output) in turn, as the engine would with every
    step verifying its tree: (decode steps, decode tokens, nodes proposed)."""
    steps = tokens = nodes = 0
    for i, (prompt, output) in enumerate(zip(prompts, outputs)):
        req = Request(f"replay-{i}", list(prompt), SamplingParams(max_tokens=max_new_tokens), 0, None)  # type: ignore[arg-type]
        req.token_ids.append(output[0])  # the first token comes from prefill
        done = 1
        while done < len(output):
            cap = max_new_tokens - done - 1  # the engine never drafts past max_tokens
            tree = drafter.propose([req], [budget if cap > 0 else 0])[0].capped(budget, cap)
            path = accepted_path(tree, output[done:])
            committed = output[done:done + len(path) + 1]
            drafter.observe(req, tree, None, Acceptance(path, list(committed)))  # type: ignore[arg-type]
            req.token_ids.extend(committed)
            done += len(committed)
            steps, tokens, nodes = steps + 1, tokens + len(committed), nodes + len(tree)
        drafter.release(req)
    return {"decode_steps": steps, "decode_tokens": tokens, "nodes_per_step": nodes / steps if steps else 0.0,
            "mean_accepted_tokens": tokens / steps if steps else None}


def plot(result: dict, path: Path) -> None:
    from benchmarks.plot import plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, rows in result["drafters"].items():
        budgets = sorted(rows, key=int)
        ax.plot([int(b) for b in budgets], [rows[b]["mean_accepted_tokens"] for b in budgets], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("draft nodes per step (every step verifies the tree)")
    ax.set_ylabel("tokens per decode step (MAT)")
    ax.set_title(f"{result['model']}: replay of greedy outputs, {result['num_prompts']} prompts", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: ReplayBenchConfig, json_out: Path, plot_out: Path) -> dict:
    loaded = load_model(cfg.model)
    engine = LLMEngine(EngineConfig(model=cfg.model, num_kv_blocks=1024), loaded=loaded)
    context = DraftContext.of_engine(loaded, engine.runner, engine.block_manager)
    for name in cfg.drafters:  # before the reference run: a bad name fails at once
        d = make_drafter(name, context, SpecConfig(drafter=name))
        if d.observed_candidates or d.wants_prompt_logits:
            raise InvalidRequestError("drafters", f"{name!r} learns from the target's logits: replay needs a "
                                                  "drafter that learns from tokens only")
    texts = humaneval(cfg.limit) if cfg.prompts == "humaneval" else from_jsonl(Path(cfg.prompts), cfg.limit)
    prompts = [engine.tokenize(t) for t in texts]
    started = time.perf_counter()
    outputs = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=cfg.max_new_tokens, seed=0))]
    print(f"reference: {sum(map(len, outputs))} greedy tokens in {time.perf_counter() - started:.0f} s", flush=True)
    rows: dict[str, dict[str, dict]] = {}
    for name in cfg.drafters:
        rows[name] = {}
        for budget in cfg.budgets:
            drafter = make_drafter(name, context, SpecConfig(drafter=name))  # fresh state per budget
            row = rows[name][str(budget)] = replay(drafter, prompts, outputs, budget, cfg.max_new_tokens)
            print(f"{name:10s} {budget:3d} nodes: MAT {row['mean_accepted_tokens']:.3f}", flush=True)
    result = {"benchmark": "replay", "model": loaded.name, "config": asdict(cfg), "environment": environment(),
              "num_prompts": len(prompts), "drafters": rows}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    plot(result, plot_out)
    print(f"wrote {json_out} and {plot_out}")
    return result
