"""The `tandem` command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from services.runtime.errors import TandemError
from services.runtime.registry import DEFAULT_MODEL, resolve

app = typer.Typer(help="Tandem: disaggregated LLM serving with lossless speculative decoding.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks: speed as ratios against a baseline measured in the same run.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered name, .gguf file or HF directory.")]
PlotOpt = Annotated[Path | None, typer.Option(help="Where to write the PNG plot (default: beside the JSON).")]


def _beside(json_out: Path, plot: Path | None) -> Path:
    """A benchmark's plot path: the one given, else the JSON's with a .png suffix (so a run
    writing its JSON elsewhere never overwrites the committed plot)."""
    return plot or json_out.with_suffix(".png")


@app.command()
def generate(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: Annotated[str | None, typer.Option(help="Raw prompt text (no chat template).")] = None,
    messages_file: Annotated[Path | None, typer.Option(
        help="JSON list of chat messages ({role, content}); the model's chat template is applied.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 keeps all.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed: the same seed gives the same tokens.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    drafter: Annotated[str, typer.Option(help=(
        "Speculative drafter: auto, none, ngram, token-recycling, aded, lookahead, draft-model, "
        "self-draft, easyspec. Speculation never changes the tokens, only the speed."))] = "auto",
    draft_model: Annotated[str | None, typer.Option(help="Draft model for draft-model / easyspec.")] = None,
    max_draft_nodes: Annotated[int, typer.Option(help="Most draft tree nodes per step.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    deployment: Annotated[str | None, typer.Option(help=(
        "Run through stage workers on a local Ray cluster: 'colocated' (one worker runs every stage) or "
        "'disaggregated' (prefill and verify pools, KV moved between them). Default: in this process."))] = None,
    config: Annotated[Path | None, typer.Option(help=(
        "Deployment YAML (mode, pools, engine); its engine section replaces --model and the drafter flags."))] = None,
) -> None:
    """Generate from one prompt, streaming tokens to stdout."""
    from services.runtime.engine import EngineConfig, LLMEngine
    from services.runtime.sampling_params import SamplingParams
    from services.spec.config import SpecConfig
    from services.spec.registry import check_drafter_name

    if (prompt is None) == (messages_file is None):
        raise typer.BadParameter("give exactly one of --prompt or --messages-file")
    request = prompt if prompt is not None else _read_messages(messages_file)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=tuple(stop or ()))
    params.validate()  # before the model loads: bad input fails at once
    resolve(model)
    check_drafter_name(drafter)
    if draft_model is not None:
        resolve(draft_model)
    spec = SpecConfig(drafter=drafter, max_nodes=max_draft_nodes, draft_model=draft_model)
    engine_config = EngineConfig(model=model, speculation=spec)
    if deployment is not None or config is not None:
        runner = _start_deployment(deployment, config, engine_config)
        stats = None
    else:
        runner = engine = LLMEngine(engine_config)
        stats = engine.stats
    try:
        _stream_to_stdout(runner, request, params, as_json, stats)
    finally:
        if stats is None:
            runner.shutdown()


def _stream_to_stdout(runner, request, params, as_json: bool, stats) -> None:
    """Stream one request from an engine or a deployment; text as it comes, or one JSON object."""
    start = time.perf_counter()
    first = None
    final = None
    for out in runner.stream(request, params):
        first = first or time.perf_counter()
        if not as_json:
            print(out.new_text, end="", flush=True)
        final = out
    elapsed = time.perf_counter() - start
    assert final is not None
    if final.error is not None:
        print(f"\nerror: {final.error}", file=sys.stderr)
        raise typer.Exit(1)
    drafter = runner.config.engine.speculation.drafter if stats is None else runner.config.speculation.drafter
    if as_json:
        print(json.dumps({
            "text": final.text,
            "token_ids": final.token_ids,
            "prompt_tokens": final.prompt_tokens,
            "finish_reason": final.finish_reason,
            "tokens_per_s": round(len(final.token_ids) / elapsed, 2),
            "time_to_first_token_s": round((first or start) - start, 4),
            "drafter": drafter,
            **({"mean_accepted_tokens": round(stats.decode_tokens / max(1, stats.decode_steps), 3)} if stats else {}),
            **({"deployment": runner.config.mode} if stats is None else {}),
        }))
    else:
        print()
        print(f"[{len(final.token_ids)} tokens, {len(final.token_ids) / elapsed:.1f} tokens/s, "
              f"finish: {final.finish_reason}]", file=sys.stderr)


def _start_deployment(mode: str | None, config: Path | None, engine):
    from services.cluster.config import DeploymentConfig
    from services.cluster.deployment import Deployment

    if mode is not None and mode not in ("colocated", "disaggregated"):
        raise typer.BadParameter(f"expected 'colocated' or 'disaggregated', got {mode!r}", param_hint="--deployment")
    if config is not None:
        try:
            cfg = DeploymentConfig.from_yaml(config)
        except FileNotFoundError:
            raise typer.BadParameter(f"{config} does not exist", param_hint="--config") from None
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--config") from None
        if mode is not None:
            cfg = dataclasses.replace(cfg, mode=mode)
    else:
        cfg = DeploymentConfig(mode=mode, engine=engine)
    resolve(cfg.engine.model)
    return Deployment(cfg)


def _read_messages(path: Path) -> list[dict]:
    try:
        messages = json.loads(path.read_text())
    except FileNotFoundError:
        raise typer.BadParameter(f"{path} does not exist", param_hint="--messages-file") from None
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"{path} is not valid JSON: {e}", param_hint="--messages-file") from None
    if not isinstance(messages, list):
        raise typer.BadParameter(f"{path} must hold a JSON list of {{role, content}} messages",
                                 param_hint="--messages-file")
    return messages


@app.command()
def demo(model: ModelOpt = DEFAULT_MODEL,
         max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 96) -> None:
    """Load the bundled model and stream answers to a few prompts, with tokens/s."""
    from orchestrator.demo import run_demo

    run_demo(model, max_tokens)


@bench_app.command("engine")
def bench_engine(
    model: ModelOpt = DEFAULT_MODEL,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results JSON.")] = Path(
        "benchmarks/results/engine.json"),
    plot: PlotOpt = None,
    streams: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,4,16",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 64,
    repeats: Annotated[int, typer.Option(help="Alternating repetitions of each measurement.")] = 2,
) -> None:
    """Decode throughput at several concurrency levels against transformers generate()."""
    from benchmarks.engine import EngineBenchConfig, run

    cfg = EngineBenchConfig(model=model, streams=tuple(int(s) for s in streams.split(",")),
                            max_new_tokens=max_new_tokens, repeats=repeats)
    run(cfg, json_out, _beside(json_out, plot))


@bench_app.command("disagg")
def bench_disagg(
    model: ModelOpt = DEFAULT_MODEL,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results JSON.")] = Path(
        "benchmarks/results/disagg.json"),
    plot: PlotOpt = None,
    decode_requests: Annotated[int, typer.Option(help="Short requests decoding throughout.")] = 4,
    long_prompts: Annotated[int, typer.Option(help="Long prompts arriving while they decode.")] = 4,
    long_prompt_tokens: Annotated[int, typer.Option(help="Tokens per long prompt.")] = 1024,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 48,
    drafter: Annotated[str, typer.Option(help="Drafter of both modes.")] = "none",
    threads: Annotated[int, typer.Option(help="CPU threads per mode, split over the stages.")] = 2,
    draft_model: Annotated[str | None, typer.Option(help=(
        "Also run a draft pool drafting with this model: PEARL whole, post-verify only, no look-ahead."))] = None,
) -> None:
    """TTFT and TPOT p50/p99, colocated against disaggregated, while long prompts arrive."""
    from benchmarks.disagg import DisaggBenchConfig, run

    cfg = DisaggBenchConfig(model=model, decode_requests=decode_requests, long_prompts=long_prompts,
                            long_prompt_tokens=long_prompt_tokens, max_new_tokens=max_new_tokens, drafter=drafter,
                            threads=threads, draft_model=draft_model)
    result = run(cfg, json_out, _beside(json_out, plot))
    for mode, r in result["modes"].items():
        d, lp = r["decode"], r["long prompt"]
        line = (f"{mode:26s} decode TPOT p50 {1000 * d['tpot_p50_s']:.0f} ms p99 {1000 * d['tpot_p99_s']:.0f} ms | "
                f"long-prompt TTFT p50 {1000 * lp['ttft_p50_s']:.0f} ms p99 {1000 * lp['ttft_p99_s']:.0f} ms")
        if "drafting" in r:
            line += (f" | look-ahead drafts {100 * r['drafting']['ahead_share']:.0f}%, "
                     f"draft wait {r['drafting']['wait_ms_per_step']:.1f} ms/step")
        print(line)


@bench_app.command("spec")
def bench_spec(
    model: ModelOpt = DEFAULT_MODEL,
    prompts: Annotated[str, typer.Option(help="JSONL file (`prompt` or `messages` per line) or 'humaneval'.")] = (
        "humaneval"),
    drafters: Annotated[str, typer.Option(help="Comma-separated drafters; 'none' is the baseline.")] = (
        "none,ngram,token-recycling,aded,lookahead,self-draft,easyspec"),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    limit: Annotated[int | None, typer.Option(help="Use the first N prompts.")] = 40,
    max_draft_nodes: Annotated[int, typer.Option(help="Most draft tree nodes per step.")] = 32,
    concurrency: Annotated[int, typer.Option(help="Prompts run at once (1 = the Spec-Bench protocol).")] = 1,
    transformers: Annotated[bool, typer.Option(help="Also time transformers generate() (plain, prompt lookup).")] = (
        True),
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results JSON.")] = Path(
        "benchmarks/results/spec.json"),
    plot: PlotOpt = None,
) -> None:
    """Every drafter against plain decoding and transformers (plain and prompt lookup), same run."""
    from benchmarks.spec import SpecBenchConfig, run
    from services.spec.registry import check_drafter_name

    names = tuple(d.strip() for d in drafters.split(",") if d.strip())
    for name in names:
        check_drafter_name(name)
    if "none" not in names:
        names = ("none", *names)
    run(SpecBenchConfig(model=model, prompts=prompts, drafters=names, max_new_tokens=max_new_tokens,
                        temperature=temperature, limit=limit, max_nodes=max_draft_nodes, concurrency=concurrency,
                        transformers_baselines=transformers), json_out, _beside(json_out, plot))


@bench_app.command("kv-transfer")
def bench_kv_transfer(
    model: ModelOpt = DEFAULT_MODEL,
    prompt_tokens: Annotated[str, typer.Option(help="Comma-separated prompt lengths whose KV is moved.")] = (
        "512,2048"),
    block_size: Annotated[int, typer.Option(help="Tokens per KV block.")] = 16,
    dtype: Annotated[str, typer.Option(help="KV cache dtype (torch name).")] = "float32",
    repeats: Annotated[int, typer.Option(help="Alternating repetitions of each measurement.")] = 15,
    layers_per_chunk: Annotated[int | None, typer.Option(help="Layers per message (default: about 4 MiB).")] = None,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results JSON.")] = Path(
        "benchmarks/results/kv_transfer.json"),
    plot: PlotOpt = None,
) -> None:
    """Bytes/s moving a request's KV blocks between two Ray actors against raw send/recv, same run."""
    from benchmarks.kv_transfer import KVTransferBenchConfig, run

    try:
        cfg = KVTransferBenchConfig(model=model, prompt_tokens=tuple(int(t) for t in prompt_tokens.split(",")),
                                    block_size=block_size, dtype=dtype, repeats=repeats,
                                    layers_per_chunk=layers_per_chunk)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    run(cfg, json_out, _beside(json_out, plot))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except TandemError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
