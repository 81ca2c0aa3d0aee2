"""`tandem bench spec`: every drafter against plain decoding of the same engine, and against
transformers `generate()` (plain and prompt lookup), on the same prompts in the same run.

Spec-Bench protocol: batch 1, greedy by default, one prompt at a time. Drafters are run
prompt by prompt, interleaved (prompt 1 with every drafter, then prompt 2, ...), so drift
on a shared machine spreads evenly over them; each drafter keeps its own engine, so
stateful drafters (Token Recycling, lookahead, ADED) learn across prompts as in serving.
With `concurrency` > 1, prompts go in groups of that many at once (continuous batching):
the load case, where speculation must not cost more than it gains.

A drafter entry `NAME:fixed` runs NAME with every request speculating a fixed amount (the
`fixed` mode of `SamplingParams.speculation`): the max_nodes likeliest nodes of its tree every
step (`NAME:fixed=N`: N nodes), where plain NAME lets goodput control choose how many (often
fewer: it trades accepted tokens for speed).

Mean accepted tokens (MAT) is tokens committed per verify step, the bonus token included
(plain decoding: 1.00), over the decode steps of every request: a step where goodput control
verified no draft counts as a step that committed one token. `mean_accepted_tokens_drafted`
is the same over the steps that did verify a draft (their share: `drafted_step_share`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.engine import environment
from benchmarks.plot import bar_chart
from benchmarks.prompts import from_jsonl, humaneval
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.errors import InvalidRequestError
from services.runtime.loader import load_model
from services.runtime.registry import DEFAULT_MODEL
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig


@dataclass(frozen=True)
class SpecBenchConfig:
    model: str = DEFAULT_MODEL
    prompts: str = "humaneval"
    """A JSONL file (`prompt` or `messages` per line) or "humaneval"."""
    drafters: tuple[str, ...] = ("none", "ngram", "token-recycling", "aded", "lookahead", "self-draft", "easyspec")
    max_new_tokens: int = 128
    temperature: float = 0.0
    limit: int | None = 40
    max_nodes: int = 32
    concurrency: int = 1
    transformers_baselines: bool = True
    prompt_lookup_num_tokens: int = 10


FIXED = "fixed"


def parse_entry(entry: str, max_nodes: int = 32) -> tuple[str, str, int]:
    """A --drafters entry -> (drafter name, the requests' speculation mode, max draft nodes):
    NAME, NAME:fixed or NAME:fixed=N."""
    name, _, mode = entry.partition(":")
    mode, eq, nodes = mode.partition("=")
    if mode not in ("", FIXED) or (mode and name == "none") or (eq and not (nodes.isdigit() and int(nodes) > 0)):
        raise InvalidRequestError("drafters", f"{entry!r}: expected a drafter name, NAME:{FIXED} or NAME:{FIXED}=N")
    return name, mode or "auto", int(nodes) if nodes else max_nodes


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def _load_prompts(cfg: SpecBenchConfig) -> list:
    if cfg.prompts == "humaneval":
        return humaneval(cfg.limit)
    return from_jsonl(Path(cfg.prompts), cfg.limit)


def plot(result: dict, path: Path) -> None:
    """The bar chart of a results JSON (so a saved result can be drawn again without rerunning)."""
    rows, cfg = result["drafters"], result["config"]
    bars = [(f"{d}\nMAT {r['mean_accepted_tokens']:.2f}", r["tokens_per_s"]) for d, r in rows.items()]
    bars += [(label.replace("transformers ", "HF "), b["tokens_per_s"]) for label, b in result["transformers"].items()]
    bar_chart(path, bars, ylabel="generated tokens/s",
              title=f"{result['model']}: speculative decoding, {result['num_prompts']} prompts\n"
                    f"{cfg['max_new_tokens']} new tokens, T={cfg['temperature']}, {cfg['concurrency']} at a time\n"
                    "(labels: ratio to plain decoding in the same run)",
              reference=rows["none"]["tokens_per_s"] if "none" in rows else None)


def run(cfg: SpecBenchConfig, json_out: Path, plot_out: Path) -> dict:
    loaded = load_model(cfg.model)
    entries = {d: parse_entry(d, cfg.max_nodes) for d in cfg.drafters}
    params = {d: SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=0, speculation=mode)
              for d, (_, mode, _) in entries.items()}
    engines = {
        d: LLMEngine(EngineConfig(model=cfg.model, num_kv_blocks=512,
                                  speculation=SpecConfig(drafter=name, max_nodes=nodes)), loaded=loaded)
        for d, (name, _, nodes) in entries.items()
    }
    prompts = _load_prompts(cfg)
    token_prompts = [engines[cfg.drafters[0]].tokenize(p) for p in prompts]
    for e in engines.values():  # warm-up
        e.generate([token_prompts[0]], SamplingParams(max_tokens=4))
    warm = {d: e.speculation_counters() for d, e in engines.items()}

    hf = None
    if cfg.transformers_baselines:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(loaded.hf_dir), dtype=torch.float32).eval()
    tallies = {d: Tally() for d in cfg.drafters}
    hf_tallies = {"transformers generate()": Tally(), "transformers prompt lookup": Tally()}

    groups = [token_prompts[i:i + cfg.concurrency] for i in range(0, len(token_prompts), cfg.concurrency)]
    for i, group in enumerate(groups):
        for d, engine in engines.items():
            start = time.perf_counter()
            outs = engine.generate(group, params[d])
            tallies[d].seconds += time.perf_counter() - start
            for out in outs:
                tallies[d].tokens += len(out.token_ids)
                tallies[d].outputs.append(out.token_ids)
        for ids in group if hf is not None else []:
            lookup = {"prompt_lookup_num_tokens": cfg.prompt_lookup_num_tokens}
            for label, extra in (("transformers generate()", {}), ("transformers prompt lookup", lookup)):
                tally = hf_tallies[label]
                x = torch.tensor([ids])
                sampling = {"do_sample": True, "temperature": cfg.temperature} if cfg.temperature > 0 else {
                    "do_sample": False}
                start = time.perf_counter()
                with torch.inference_mode():
                    gen = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=cfg.max_new_tokens,
                                      **sampling, **extra)
                tally.seconds += time.perf_counter() - start
                tally.tokens += gen.shape[1] - x.shape[1]
        line = ", ".join(f"{d} {tallies[d].tokens_per_s:.1f}" for d in cfg.drafters)
        print(f"[{i + 1}/{len(groups)}] tokens/s: {line}", flush=True)

    base = tallies["none"] if "none" in tallies else None
    rows = {}
    for d, engine in engines.items():
        c = {k: v - warm[d][k] for k, v in engine.speculation_counters().items()}
        t = tallies[d]
        same = sum(a == b for a, b in zip(t.outputs, base.outputs)) if base else None
        rows[d] = {
            "tokens_per_s": t.tokens_per_s,
            "speedup_vs_none": t.tokens_per_s / base.tokens_per_s if base else None,
            "mean_accepted_tokens": c["decode_tokens"] / c["decode_steps"] if c["decode_steps"] else None,
            "mean_accepted_tokens_drafted": 1 + c["accepted_tokens"] / c["drafts"] if c["drafts"] else 1.0,
            "drafted_step_share": c["drafts"] / c["decode_steps"] if c["decode_steps"] else 0.0,
            "draft_ms": 1000 * c["draft_seconds"] / c["steps"] if c["steps"] else 0.0,
            "verify_ms": 1000 * c["forward_seconds"] / c["steps"] if c["steps"] else 0.0,
            "identical_to_none": f"{same}/{len(t.outputs)}" if base else None,
            "tokens": t.tokens,
            "seconds": t.seconds,
        }
        if engine.speculator is not None:
            rows[d]["drafter_state_bytes"] = engine.speculator.drafter.state_bytes()
    baselines = {label: {"tokens_per_s": t.tokens_per_s, "tokens": t.tokens, "seconds": t.seconds,
                         "speedup_vs_none": t.tokens_per_s / base.tokens_per_s if base else None}
                 for label, t in hf_tallies.items() if t.seconds}
    best = max((d for d in rows if d != "none"), key=lambda d: rows[d]["tokens_per_s"], default=None)
    result = {
        "benchmark": "spec",
        "model": loaded.name,
        "config": asdict(cfg),
        "environment": environment(),
        "num_prompts": len(token_prompts),
        "drafters": rows,
        "transformers": baselines,
        "best_drafter": best,
    }
    if best and "transformers prompt lookup" in baselines:
        result["best_vs_transformers_prompt_lookup"] = (
            rows[best]["tokens_per_s"] / baselines["transformers prompt lookup"]["tokens_per_s"])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))

    plot(result, plot_out)
    print(json.dumps({d: {k: rows[d][k] for k in ("tokens_per_s", "speedup_vs_none", "mean_accepted_tokens",
                                                  "identical_to_none")} for d in rows}, indent=2))
    print(f"wrote {json_out} and {plot_out}")
    return result
