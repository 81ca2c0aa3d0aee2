"""`tandem bench serve`: a running server under Poisson arrivals, over gRPC, with speculation off,
fixed and auto, in the same run.

For each arrival rate, each speculation mode gets the same arrival schedule, one mode after
another; with `rounds` > 1 the modes take turns again, every other round in reverse order, and
each mode's figures pool its rounds. These machines are shared: on identical work, a mode's
TPOT moved 20% between runs and its second segment ran ~9% slower than its first, so one
segment per mode cannot show a difference of a few percent, while reversed rounds (ABBA)
cancel a steady drift and the position effect.
Every request of the run gets a prompt of its own (HumanEval, in order; see deal_matched for
how a rate's prompts are split between the modes): the retrieval drafters learn from every
output the server has produced, so a prompt asked twice would be drafted from its own earlier
answer and flatter whichever mode came second. A run that needs more prompts than the set has
says so (`prompts_repeated`).
Timing is client-side: TTFT from sending the request to the first token, ITL between
consecutive streamed chunks, TPOT = (latency - TTFT) / (tokens - 1).
Goodput: requests that met every SLO given (TTFT and TPOT) per second of the arrival window,
i.e. the rate times the share that met them (DistServe's sense). Not per second until the last
answer: with every request on time, that would rank modes by when one last request ended.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from benchmarks.engine import environment
from benchmarks.prompts import humaneval
from benchmarks.stats import percentile
from orchestrator.client import build_request
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

MODES = {"off": "none", "fixed": "fixed", "auto": "auto"}  # the label -> GenerateRequest.drafter


@dataclass(frozen=True)
class ServeBenchConfig:
    server: str = "127.0.0.1:50051"
    rates: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    """Mean request arrivals per second (Poisson)."""
    duration_s: float = 60.0
    """Arrivals per (rate, mode) span this long; the run then waits for the last requests."""
    max_new_tokens: int = 128
    prompts: int = 164
    """HumanEval prompts to draw from, in order, one per request."""
    modes: tuple[str, ...] = ("off", "fixed", "auto")
    rounds: int = 1
    """Times the modes take turns at each rate; odd rounds run them in reverse order."""
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    seed: int = 0
    api_key: str | None = None


@dataclass
class RequestTiming:
    sent: float
    first: float | None = None
    end: float | None = None
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def tpot(self) -> float | None:
        if self.first is None or self.end is None or self.tokens < 2:
            return None
        return (self.end - self.first) / (self.tokens - 1)


async def _one(stub, request: pb.GenerateRequest, metadata, timing: RequestTiming) -> None:
    try:
        async for message in stub.Generate(request, metadata=metadata):
            if message.HasField("chunk") and message.chunk.token_ids:
                now = time.perf_counter()
                timing.first = timing.first or now
                timing.chunks.append(now)
                timing.tokens += len(message.chunk.token_ids)
            elif message.HasField("complete") and message.complete.finish_reason == "error":
                timing.error = "error"  # failed at the server: an in-stream ending, not a status
        timing.end = time.perf_counter()
    except grpc.aio.AioRpcError as e:
        timing.error = e.code().name


async def _run_schedule(cfg: ServeBenchConfig, stub, prompts: list[str], gaps: list[float], drafter: str,
                        ) -> tuple[list[RequestTiming], float]:
    metadata = (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else ()
    tasks, timings = [], []
    start = time.perf_counter()
    for i, gap in enumerate(gaps):
        await asyncio.sleep(max(0.0, start + gap - time.perf_counter()))
        request = build_request(prompts[i % len(prompts)], max_tokens=cfg.max_new_tokens, temperature=0,
                                ignore_eos=True, drafter=drafter)
        timing = RequestTiming(time.perf_counter())
        timings.append(timing)
        tasks.append(asyncio.create_task(_one(stub, request, metadata, timing)))
    await asyncio.gather(*tasks)
    return timings, time.perf_counter() - start


def deal_matched(prompts: list[str], ways: int, rng: random.Random) -> list[list[str]]:
    """Split prompts into `ways` lists whose i-th entries are about equally long: the same
    arrival gets a prompt of about the same length in every mode. Dealt in plain turns, one
    mode's stretch of HumanEval had 22% more prompt tokens than another's at the same rate,
    and attention over longer contexts made its plain steps 8-10% dearer. Sorted by length,
    cut into groups of `ways`, groups shuffled (so length does not follow arrival order) and
    each group's longest prompt rotated through the modes."""
    ordered = sorted(prompts, key=len)
    groups = [ordered[i:i + ways] for i in range(0, len(ordered) - ways + 1, ways)]
    rng.shuffle(groups)
    return [[group[(j + k) % ways] for j, group in enumerate(groups)] for k in range(ways)]


def round_order(modes: tuple[str, ...], round_index: int) -> tuple[str, ...]:
    """The order the modes run in, round by round: A B C, C B A, A B C, ..."""
    return modes if round_index % 2 == 0 else modes[::-1]


def _summary(cfg: ServeBenchConfig, timings: list[RequestTiming], elapsed: float, windows: int = 1) -> dict:
    done = [t for t in timings if t.error is None and t.end is not None]
    ttft = [t.ttft for t in done if t.ttft is not None]
    tpot = [t.tpot for t in done if t.tpot is not None]
    itl = [b - a for t in done for a, b in zip(t.chunks, t.chunks[1:])]
    good = [t for t in done if t.ttft is not None and t.ttft <= cfg.slo_ttft_s
            and (t.tpot is None or t.tpot <= cfg.slo_tpot_s)]
    errors: dict[str, int] = {}
    for t in timings:
        if t.error:
            errors[t.error] = errors.get(t.error, 0) + 1
    return {
        "requests": len(timings), "completed": len(done), "errors": errors, "elapsed_s": elapsed,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "output_tokens_per_s": sum(t.tokens for t in done) / elapsed,
        "goodput_rps": len(good) / (cfg.duration_s * windows),
        "slo_attained": len(good) / len(timings) if timings else 0.0,
    }


async def _bench(cfg: ServeBenchConfig) -> dict:
    pool = humaneval(cfg.prompts)
    rng = random.Random(cfg.seed)
    schedules = {}
    for rate in cfg.rates:  # one Poisson schedule per rate, shared by the modes
        gaps, t = [], 0.0
        while (t := t + rng.expovariate(rate)) <= cfg.duration_s:
            gaps.append(t)
        schedules[rate] = gaps
    needed = 2 + cfg.rounds * len(cfg.modes) * sum(len(g) for g in schedules.values())
    fresh = iter(pool * (-(-needed // len(pool))))  # in order; cycles only if the set is too small
    async with grpc.aio.insecure_channel(cfg.server) as channel:
        stub = pb_grpc.TandemStub(channel)
        metadata = (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else ()
        info = await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata)
        models = await stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
        # Warm-up: the server's cost models settle before anything is timed.
        await _run_schedule(cfg, stub, [next(fresh), next(fresh)], [0.0, 0.0], "auto")
        rates = {str(rate): await _run_rate(cfg, stub, metadata, rate, gaps, fresh, rng)
                 for rate, gaps in schedules.items()}
        return {"server": {"address": cfg.server, "model": models.models[0].id, "version": info.version,
                           "deployment_mode": info.deployment_mode, "drafter": info.speculation.drafter},
                "requests": needed, "prompts_repeated": needed > len(pool), "rates": rates}


async def _run_rate(cfg: ServeBenchConfig, stub, metadata, rate: float, gaps: list[float], fresh, rng) -> dict:
    """Every mode at one rate, `cfg.rounds` times in alternating order, each round on fresh
    prompts; per mode, its rounds pooled (and listed under "rounds" when there are several)."""
    timings: dict[str, list[RequestTiming]] = {mode: [] for mode in cfg.modes}
    elapsed = dict.fromkeys(cfg.modes, 0.0)
    counters: dict[str, dict[str, float]] = {mode: {} for mode in cfg.modes}
    per_round: dict[str, list[dict]] = {mode: [] for mode in cfg.modes}
    for r in range(cfg.rounds):
        stretch = [next(fresh) for _ in range(len(cfg.modes) * len(gaps))]
        dealt = dict(zip(cfg.modes, deal_matched(stretch, len(cfg.modes), rng)))
        for mode in round_order(cfg.modes, r):
            before = (await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata)).speculation
            got, took = await _run_schedule(cfg, stub, dealt[mode], gaps, MODES[mode])
            after = (await stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=metadata)).speculation
            diff = counter_diff(before, after)
            timings[mode] += got
            elapsed[mode] += took
            counters[mode] = {k: counters[mode].get(k, 0) + v for k, v in diff.items()}
            row = _summary(cfg, got, took) | {"round": r, "server_steps": server_steps(diff)}
            per_round[mode].append(row)
            _print_row(rate, mode, row, f" (round {r + 1}/{cfg.rounds})" if cfg.rounds > 1 else "")
    pooled = {}
    for mode in cfg.modes:
        row = _summary(cfg, timings[mode], elapsed[mode], cfg.rounds)
        row["server_steps"] = server_steps(counters[mode])
        if cfg.rounds > 1:
            row["rounds"] = per_round[mode]
            _print_row(rate, mode, row, f" (pooled over {cfg.rounds} rounds)")
        pooled[mode] = row
    return pooled


_COUNTERS = ("steps", "decode_steps", "decode_tokens", "drafts", "draft_tokens", "accepted_tokens",
             "forward_seconds", "draft_seconds", "expected_accepted", "controlled_accepted",
             "controlled_steps", "predicted_seconds", "controlled_seconds")


def counter_diff(before: pb.SpeculationStats, after: pb.SpeculationStats) -> dict[str, float]:
    """The server's counters' growth while one mode ran. The modes run one after another, so
    nothing else ran on the server meanwhile."""
    return {f: getattr(after, f) - getattr(before, f) for f in _COUNTERS}


def server_steps(d: dict[str, float]) -> dict:
    """What the server's steps did while a mode ran (counter_diff, or its sum over rounds): how
    many requests a step decoded, how often a decoding request was drafted for, what a drafted
    one gained, and where the step time went."""
    steps, decoded, drafts = d["steps"], d["decode_steps"], d["drafts"]
    return {
        "steps": steps,
        "requests_per_step": decoded / steps if steps else 0.0,
        "drafted_share": drafts / decoded if decoded else 0.0,
        "draft_tokens_per_draft": d["draft_tokens"] / drafts if drafts else 0.0,
        "accepted_per_draft": d["accepted_tokens"] / drafts if drafts else 0.0,
        "mean_accepted_tokens": d["decode_tokens"] / decoded if decoded else 0.0,
        "forward_ms_per_step": 1000 * d["forward_seconds"] / steps if steps else 0.0,
        "draft_ms_per_step": 1000 * d["draft_seconds"] / steps if steps else 0.0,
        # The goodput controller's calibration: realised over expected (1 is exact).
        "controller_accepted_vs_expected": (d["controlled_accepted"] / d["expected_accepted"]
                                            if d["expected_accepted"] else None),
        "controller_seconds_vs_predicted": (d["controlled_seconds"] / d["predicted_seconds"]
                                            if d["predicted_seconds"] else None),
        "controller_steps": d["controlled_steps"],
    }


def _print_row(rate: float, mode: str, row: dict, note: str) -> None:
    print(f"rate {rate:4}/s {mode:5s}{note}: {row['completed']}/{row['requests']} done, TTFT p50 "
          f"{_fmt(row['ttft_p50_s'])} p99 {_fmt(row['ttft_p99_s'])}, TPOT p50 {_fmt(row['tpot_p50_s'])}, "
          f"goodput {row['goodput_rps']:.2f} req/s", flush=True)
    st = row["server_steps"]
    print(f"  server: {st['steps']} steps of {st['requests_per_step']:.1f} decoding requests, drafted "
          f"{100 * st['drafted_share']:.0f}%, {st['mean_accepted_tokens']:.2f} tokens per request-step, "
          f"forward {st['forward_ms_per_step']:.0f} ms + draft {st['draft_ms_per_step']:.1f} ms a step", flush=True)
    if st["controller_steps"]:
        print(f"  controller: {st['controller_steps']} steps verified its nodes; accepted/expected "
              f"{st['controller_accepted_vs_expected']:.2f}, seconds/predicted "
              f"{st['controller_seconds_vs_predicted']:.2f}", flush=True)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f} ms"


def run(cfg: ServeBenchConfig, json_out: Path, plot_out: Path) -> dict:
    measured = asyncio.run(_bench(cfg))
    rates = measured["rates"]
    lowest, highest = str(min(cfg.rates)), str(max(cfg.rates))
    ratios = {}
    if "off" in cfg.modes and "auto" in cfg.modes:
        for label, rate in (("lowest_rate", lowest), ("highest_rate", highest)):
            off, auto = rates[rate]["off"], rates[rate]["auto"]
            ratios[label] = {
                "rate": float(rate),
                "auto_tpot_p50_vs_off": _ratio(auto["tpot_p50_s"], off["tpot_p50_s"]),
                "auto_goodput_vs_off": _ratio(auto["goodput_rps"], off["goodput_rps"]),
                "auto_tokens_per_s_vs_off": _ratio(auto["output_tokens_per_s"], off["output_tokens_per_s"]),
            }
            if cfg.rounds > 1:  # the spread: each round's auto against the same round's off
                ratios[label]["auto_tpot_p50_vs_off_per_round"] = [
                    _ratio(a["tpot_p50_s"], o["tpot_p50_s"]) for a, o in zip(auto["rounds"], off["rounds"])]
    result = {"benchmark": "serve", "config": asdict(cfg) | {"api_key": None}, "environment": environment(),
              **measured, "auto_vs_off": ratios}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    plot(result, plot_out)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {json_out} and {plot_out}")
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def plot(result: dict, path: Path) -> None:
    from benchmarks.plot import plt

    rates = sorted(result["rates"], key=float)
    modes = list(result["rates"][rates[0]])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for metric, ax, label in (("tpot_p50_s", axes[0], "TPOT p50 (ms)"), ("ttft_p50_s", axes[1], "TTFT p50 (ms)"),
                              ("goodput_rps", axes[2], "goodput (requests/s meeting the SLOs)")):
        for mode in modes:
            ys = [result["rates"][r][mode][metric] for r in rates]
            scale = 1 if metric == "goodput_rps" else 1000
            line, = ax.plot([float(r) for r in rates], [None if y is None else y * scale for y in ys], marker="o",
                            label=mode)
            for r in rates:  # each round's own figure, faint, to show the spread the pooled one hides
                for one in result["rates"][r][mode].get("rounds", []):
                    if one[metric] is not None:
                        ax.plot(float(r), one[metric] * scale, marker="x", color=line.get_color(), alpha=0.5)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.legend()
    cfg = result["config"]
    rounds = f", {cfg['rounds']} rounds pooled (x: each round)" if cfg.get("rounds", 1) > 1 else ""
    fig.suptitle(f"tandem bench serve: speculation {' / '.join(modes)}, same server, same schedule{rounds} "
                 f"({cfg['max_new_tokens']} tokens per request, SLO TTFT {cfg['slo_ttft_s']} s, "
                 f"TPOT {cfg['slo_tpot_s']} s)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
