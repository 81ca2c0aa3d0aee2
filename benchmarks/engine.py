"""`tandem bench engine`: decode throughput of the engine at 1, 4 and 16 concurrent streams,
against transformers `generate()` on the same weights and prompts, in the same run.

Every figure is end-to-end: wall time from submitting the requests to the last token, over
all tokens generated (prefill included, for both engines). Measurements alternate between
the engines across repeats, and the median is kept, since these machines are shared.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.plot import bar_chart
from benchmarks.prompts import humaneval
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.registry import DEFAULT_MODEL
from services.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineBenchConfig:
    model: str = DEFAULT_MODEL
    streams: tuple[int, ...] = (1, 4, 16)
    max_new_tokens: int = 64
    single_stream_prompts: int = 4
    """Prompts run one after another for the single-stream figures (ours and transformers')."""
    repeats: int = 2


@dataclass
class Measurement:
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Result:
    label: str
    streams: int
    runs: list[Measurement] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(m.tokens_per_s for m in self.runs)


def _ours(engine: LLMEngine, prompts: list[str], streams: int, max_new: int) -> Measurement:
    params = SamplingParams(max_tokens=max_new, ignore_eos=True)
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(prompts), streams):
        tokens += sum(len(o.token_ids) for o in engine.generate(prompts[i:i + streams], params))
    return Measurement(tokens, time.perf_counter() - start)


def _transformers(model, tokenizer, prompts: list[str], max_new: int) -> Measurement:
    start = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tokenizer.encode(p)])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False)
            tokens += out.shape[1] - ids.shape[1]
    return Measurement(tokens, time.perf_counter() - start)


def run(cfg: EngineBenchConfig, json_out: Path, plot_out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=cfg.model))
    hf = AutoModelForCausalLM.from_pretrained(str(engine.loaded.hf_dir), dtype=torch.float32).eval()
    prompts = humaneval(max(max(cfg.streams), cfg.single_stream_prompts))
    single = prompts[:cfg.single_stream_prompts]

    # Warm both up (allocator, thread pools, kernels).
    _ours(engine, prompts[:2], 2, 8)
    _transformers(hf, engine.tokenizer, prompts[:1], 8)

    baseline = Result("transformers generate()", 1)
    ours = {s: Result(f"Tandem, {s} stream{'s' if s > 1 else ''}", s) for s in cfg.streams}
    for _ in range(cfg.repeats):
        baseline.runs.append(_transformers(hf, engine.tokenizer, single, cfg.max_new_tokens))
        for s in cfg.streams:
            batch = single if s == 1 else prompts[:s]
            ours[s].runs.append(_ours(engine, batch, s, cfg.max_new_tokens))
        print(f"  transformers {baseline.runs[-1].tokens_per_s:.1f} tok/s; " + ", ".join(
            f"{s} streams {ours[s].runs[-1].tokens_per_s:.1f} tok/s" for s in cfg.streams), flush=True)

    one = ours[min(cfg.streams)]
    result = {
        "benchmark": "engine",
        "model": engine.loaded.name,
        "config": asdict(cfg),
        "environment": environment(),
        "baseline": {"label": baseline.label, "tokens_per_s": baseline.tokens_per_s,
                     "ms_per_token": 1000 / baseline.tokens_per_s, "runs": [asdict(m) for m in baseline.runs]},
        "streams": [
            {"streams": s, "tokens_per_s": r.tokens_per_s, "ms_per_token_per_stream": 1000 * s / r.tokens_per_s,
             "throughput_vs_single_stream": r.tokens_per_s / one.tokens_per_s,
             "runs": [asdict(m) for m in r.runs]}
            for s, r in ours.items()
        ],
        # Target <= 1.0: our single-stream time per token over transformers'.
        "single_stream_time_per_token_vs_transformers": baseline.tokens_per_s / one.tokens_per_s,
        # Target >= 4: throughput at the most streams over one stream.
        "max_streams_throughput_vs_single": ours[max(cfg.streams)].tokens_per_s / one.tokens_per_s,
    }
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    bars = [(baseline.label, baseline.tokens_per_s)] + [(r.label, r.tokens_per_s) for r in ours.values()]
    bar_chart(plot_out, bars, ylabel="generated tokens/s",
              title=f"{engine.loaded.name}: generated tokens/s, {cfg.max_new_tokens} new tokens per request\n"
                    "(labels: ratio to transformers generate() in the same run)",
              reference=baseline.tokens_per_s)
    print(json.dumps({k: result[k] for k in ("single_stream_time_per_token_vs_transformers",
                                              "max_streams_throughput_vs_single")}, indent=2))
    print(f"wrote {json_out} and {plot_out}")
    return result


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }
