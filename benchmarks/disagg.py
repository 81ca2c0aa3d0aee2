"""`tandem bench disagg`: TTFT and TPOT, colocated against disaggregated, under a mixed load.

The load is the one disaggregation is for: short requests decode steadily while long prompts
arrive one after another. Colocated, a long prompt's prefill chunks share the forward passes
of the decoding requests, so their time per output token jumps while it lasts;
disaggregated, prefill runs on its own worker and the decoding requests only pay for the
KV hand-off. Both modes get the same CPU threads in total (colocated: one worker with all
of them; disaggregated: split between the prefill and the verify worker) and the same
arrival schedule, run in turn in the same process.

Latencies are per request: TTFT from submission to the first token, TPOT the mean gap
between its later tokens. Reported as p50 and p99 over requests, per request kind.

With `draft_model`, three more disaggregated runs put that draft model on a draft pool of its
own: PEARL whole (post- and pre-verify), post-verify only, and no drafting ahead. Their
`drafting` rows measure the overlap — the share of drafts taken from a look-ahead made during
the previous step, requests decoded plainly while their draft was made, and the time the
verify worker waited for drafts per step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.engine import environment
from benchmarks.prompts import humaneval
from benchmarks.stats import percentile
from services.cluster.config import DeploymentConfig, PoolConfig
from services.cluster.deployment import Deployment
from services.runtime.engine import EngineConfig
from services.runtime.loader import hf_directory
from services.runtime.registry import DEFAULT_MODEL
from services.runtime.sampling_params import SamplingParams
from services.runtime.tokenizer import Tokenizer
from services.spec.config import SpecConfig


@dataclass(frozen=True)
class DisaggBenchConfig:
    model: str = DEFAULT_MODEL
    decode_requests: int = 4
    """Short requests (HumanEval prompts) that start together and decode throughout."""
    long_prompts: int = 4
    long_prompt_tokens: int = 1024
    long_interval_s: float = 1.5
    """Gap between long-prompt arrivals; the first arrives once the short ones decode."""
    max_new_tokens: int = 48
    drafter: str = "none"
    threads: int = 2
    """CPU threads in total per mode."""
    draft_model: str | None = None
    """Adds the draft-pool runs (DRAFT_POOL_MODES), drafting with this model."""

    @property
    def modes(self) -> tuple[str, ...]:
        return ("colocated", "disaggregated", *(DRAFT_POOL_MODES if self.draft_model else ()))


# Draft-pool runs: mode -> (SpecConfig.draft_ahead, SpecConfig.pre_verify).
DRAFT_POOL_MODES = {
    "draft pool + PEARL": (True, True),
    "draft pool, post-verify only": (True, False),
    "draft pool, no look-ahead": (False, False),
}


@dataclass
class _Timeline:
    kind: str
    submitted: float
    token_times: list[float] = field(default_factory=list)

    def ttft(self) -> float:
        return self.token_times[0] - self.submitted

    def tpot(self) -> float | None:
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


def _deployment(cfg: DisaggBenchConfig, mode: str) -> Deployment:
    spec = SpecConfig(drafter=cfg.drafter)
    if mode in DRAFT_POOL_MODES:
        ahead, pre_verify = DRAFT_POOL_MODES[mode]
        spec = SpecConfig(drafter="draft-model", draft_model=cfg.draft_model, placement="draft",
                          draft_ahead=ahead, pre_verify=pre_verify)
    engine = EngineConfig(model=cfg.model, num_kv_blocks=1024, speculation=spec)
    stages = 3 if mode in DRAFT_POOL_MODES else 2
    share = PoolConfig(num_cpus=cfg.threads / stages)  # torch threads: at least one each
    return Deployment(DeploymentConfig(mode="colocated" if mode == "colocated" else "disaggregated", engine=engine,
                                       colocated=PoolConfig(num_cpus=cfg.threads), prefill=share, verify=share,
                                       draft=share))


def _run_mode(cfg: DisaggBenchConfig, mode: str, short: list[list[int]], long: list[list[int]]) -> dict:
    params = SamplingParams(max_tokens=cfg.max_new_tokens, ignore_eos=True)
    with _deployment(cfg, mode) as d:
        d.generate([short[0]], SamplingParams(max_tokens=4))  # warm-up: kernels, pair groups
        d.generate([long[0][:64]], SamplingParams(max_tokens=4))
        timelines: dict[str, _Timeline] = {}
        for p in short:
            timelines[d.add_request(p, params)] = _Timeline("decode", time.perf_counter())
        first_long = None
        arrivals = list(long)
        while d.has_unfinished_requests() or arrivals:
            now = time.perf_counter()
            decoding = all(t.token_times for t in timelines.values() if t.kind == "decode")
            if arrivals and decoding and (first_long is None or now >= first_long + cfg.long_interval_s * (
                    len(long) - len(arrivals))):
                first_long = first_long or now
                timelines[d.add_request(arrivals.pop(0), params)] = _Timeline("long prompt", now)
            for out in d.step():
                if out.error:
                    raise RuntimeError(out.error)
                stamp = time.perf_counter()
                timelines[out.request_id].token_times += [stamp] * len(out.new_token_ids)
        transfer = asdict(d.transfer)
        drafting = [d.call(w, "draft_stats") for w in d.workers("verify")] if "verify" in d.pools else []
    result: dict = {"transfer": transfer}
    drafting = [x for x in drafting if x]
    if drafting:
        total = {k: sum(x[k] for x in drafting) for k in drafting[0]}
        result["drafting"] = {**total, "ahead_share": total["ahead_used"] / max(1, total["drafted"]),
                              "wait_ms_per_step": 1000 * total["wait_seconds"] / max(1, total["steps"])}
    for kind in ("decode", "long prompt"):
        ts = [t for t in timelines.values() if t.kind == kind]
        ttfts = [t.ttft() for t in ts]
        tpots = [x for x in (t.tpot() for t in ts) if x is not None]
        result[kind] = {"requests": len(ts), "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
                        "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99)}
    return result


def run(cfg: DisaggBenchConfig, json_out: Path, plot_out: Path) -> dict:
    _, hf_dir = hf_directory(cfg.model)
    tokenizer = Tokenizer.from_dir(hf_dir)
    texts = humaneval()
    short = [tokenizer.encode(t) for t in texts[:cfg.decode_requests]]
    corpus = tokenizer.encode("\n".join(texts[cfg.decode_requests:]))
    n = cfg.long_prompt_tokens
    long = [corpus[i * n:(i + 1) * n] for i in range(cfg.long_prompts)]
    modes = {mode: _run_mode(cfg, mode, short, long) for mode in cfg.modes}
    result = {"benchmark": "disagg", "model": cfg.model, "config": asdict(cfg), "environment": environment(),
              "modes": modes}
    if {"colocated", "disaggregated"} <= set(modes):
        c, d = modes["colocated"]["decode"], modes["disaggregated"]["decode"]
        result["decode_tpot_p99_ratio_disagg_vs_colocated"] = d["tpot_p99_s"] / c["tpot_p99_s"]
        result["decode_tpot_p50_ratio_disagg_vs_colocated"] = d["tpot_p50_s"] / c["tpot_p50_s"]
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    plot(result, plot_out)
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("decode", "tpot_p50_s"), ("decode", "tpot_p99_s"), ("long prompt", "ttft_p50_s"),
               ("long prompt", "ttft_p99_s")]
    modes = list(result["modes"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [1000 * (result["modes"][mode][kind][m] or 0) for kind, m in metrics]
        rects = ax.bar([x + i * width for x in range(len(metrics))], values, width, label=mode)
        for r, v in zip(rects, values):
            ax.annotate(f"{v:.0f}", (r.get_x() + r.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(metrics))],
                  [f"{k}\n{m.replace('_s', '')}" for k, m in metrics], fontsize=9)
    ax.set_ylabel("milliseconds")
    cfg = result["config"]
    ax.set_title(f"{result['model']}: {cfg['decode_requests']} decoding requests, {cfg['long_prompts']} prompts of "
                 f"{cfg['long_prompt_tokens']} tokens arriving ({cfg['threads']} threads per mode)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
