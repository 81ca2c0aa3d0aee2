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
ApiKeyOpt = Annotated[str | None, typer.Option(envvar="TANDEM_API_KEY", show_default=False, help=(
    "API key for --server (better from $TANDEM_API_KEY: the command line is visible to other users)."))]
TlsCaOpt = Annotated[Path | None, typer.Option(help="PEM root certificate(s) to reach a TLS --server.")]
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
    server: Annotated[str | None, typer.Option(help=(
        "HOST:PORT of a running `tandem serve`: stream from it over gRPC instead of loading a model here."))] = None,
    api_key: ApiKeyOpt = None,
    tls_ca: TlsCaOpt = None,
) -> None:
    """Generate from one prompt, streaming tokens to stdout."""
    if server is not None:
        if (prompt is None) == (messages_file is None):
            raise typer.BadParameter("give exactly one of --prompt or --messages-file")
        from orchestrator.client import build_request

        request = build_request(prompt, _read_messages(messages_file) if messages_file else None,
                                max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                stop=stop or (), drafter="" if drafter == "auto" else drafter)
        _stream_from_server(_client(server, api_key, tls_ca), request, as_json)
        return
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


def _client(address: str, api_key: str | None, tls_ca: Path | None):
    from orchestrator.client import TandemClient

    return TandemClient(address, api_key=api_key, root_certificates=tls_ca.read_bytes() if tls_ca else None)


def _stream_from_server(client, request, as_json: bool) -> None:
    import grpc

    address = client.address
    start = time.perf_counter()
    first = None
    token_ids: list[int] = []
    text, final = "", None
    with client:
        try:
            for message in client.stream(request):
                if message.HasField("chunk"):
                    first = first or time.perf_counter()
                    token_ids += message.chunk.token_ids
                    text += message.chunk.text
                    if not as_json:
                        print(message.chunk.text, end="", flush=True)
                else:
                    final = message
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            raise typer.Exit(1) from None
    elapsed = time.perf_counter() - start
    done = final.complete
    if done.finish_reason == "error":
        print(f"\nerror: {done.error}", file=sys.stderr)
        raise typer.Exit(1)
    if as_json:
        print(json.dumps({"request_id": final.request_id, "text": text, "token_ids": token_ids,
                          "prompt_tokens": done.usage.prompt_tokens, "finish_reason": done.finish_reason,
                          "tokens_per_s": round(len(token_ids) / elapsed, 2),
                          "time_to_first_token_s": round((first or start) - start, 4), "server": address}))
    else:
        print()
        print(f"[{len(token_ids)} tokens, {len(token_ids) / elapsed:.1f} tokens/s, finish: {done.finish_reason}]",
              file=sys.stderr)


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
def serve(
    model: ModelOpt = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port.")] = 50051,
    mode: Annotated[str, typer.Option(help=(
        "embedded (the engine in this process), colocated or disaggregated (stage pools on Ray).")) ] = "embedded",
    config: Annotated[Path | None, typer.Option(help="Deployment YAML (mode, pools, engine); replaces --mode.")] = None,
    drafter: Annotated[str, typer.Option(help="The drafter the server runs (auto, none, ngram, ...).")] = "auto",
    redis: Annotated[str | None, typer.Option(help=(
        "Request state in Redis: redis://[:password@]host:port/db or rediss:// (TLS). Default: in memory."))] = None,
    redis_prefix: Annotated[str, typer.Option(help="Key prefix in Redis (deployments sharing one Redis).")] = (
        "tandem"),
    max_running: Annotated[int, typer.Option(help="Requests running at once; more wait in the queue.")] = 64,
    max_queued: Annotated[int, typer.Option(help="Requests waiting for room; more get RESOURCE_EXHAUSTED.")] = 256,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus metrics over HTTP on this port.")] = 9400,
    http_port: Annotated[int | None, typer.Option(help=(
        "Also serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port."))] = None,
    lease_ttl_s: Annotated[float, typer.Option(help=(
        "Seconds a request stays this replica's without a heartbeat; then another replica may resume it."))] = 10.0,
    api_keys_file: Annotated[Path | None, typer.Option(help=(
        "File of accepted API keys, one per line (also $TANDEM_API_KEYS, comma-separated). None: no keys."))] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate chain: serve gRPC over TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    max_streams_per_key: Annotated[int | None, typer.Option(help="Concurrent streams per API key.")] = None,
    otlp_endpoint: Annotated[str | None, typer.Option(help=(
        "Send OpenTelemetry traces to this OTLP/gRPC collector (e.g. http://otel-collector:4317)."))] = None,
) -> None:
    """Serve the gRPC API (tandem.v1.Tandem, health, reflection) until interrupted."""
    import asyncio
    import signal

    from orchestrator.admission import AdmissionConfig
    from orchestrator.backend import MODES
    from orchestrator.lifecycle import LifecycleConfig
    from orchestrator.security import SecurityConfig, read_api_keys
    from orchestrator.server import ServerConfig, TandemServer
    from orchestrator.tracing import TracingConfig
    from services.runtime.engine import EngineConfig
    from services.spec.config import SpecConfig
    from services.spec.registry import check_drafter_name

    if mode not in MODES:
        raise typer.BadParameter(f"expected one of {MODES}, got {mode!r}", param_hint="--mode")
    check_drafter_name(drafter)
    lifecycle = LifecycleConfig(lease_ttl_s=lease_ttl_s, heartbeat_s=min(2.0, lease_ttl_s / 3))
    admission = AdmissionConfig(max_running_requests=max_running, max_queued_requests=max_queued)
    try:
        security = SecurityConfig(api_keys=read_api_keys(api_keys_file), tls_cert_file=tls_cert, tls_key_file=tls_key,
                                  max_streams_per_key=max_streams_per_key)
    except (OSError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--api-keys-file / --tls-cert / --tls-key") from None
    common = dict(host=host, port=port, redis_url=redis, redis_prefix=redis_prefix, lifecycle=lifecycle,
                  admission=admission,
                  metrics_port=metrics_port, http_port=http_port, security=security,
                  tracing=TracingConfig(otlp_endpoint=otlp_endpoint))
    if config is not None:
        cfg = ServerConfig.with_deployment_file(config, **common)
    else:
        resolve(model)
        cfg = ServerConfig(mode=mode, engine=EngineConfig(model=model, speculation=SpecConfig(drafter=drafter)),
                           **common)

    async def run() -> None:
        server = TandemServer(cfg)
        await server.start()
        metrics = f"; metrics on http://{host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        if server.http_port:
            metrics += f"; OpenAI-compatible HTTP on http://{host}:{server.http_port}/v1"
        print(f"tandem serving {server.backend.model.name} on {server.address} ({cfg.mode}; drafter "
              f"{server.backend.model.drafter}; state {'redis' if redis else 'in memory'}{metrics}). Ctrl-C stops.",
              file=sys.stderr, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        print("draining...", file=sys.stderr, flush=True)
        await server.stop()

    asyncio.run(run())


@app.command()
def status(server: Annotated[str, typer.Option(help="HOST:PORT of a running `tandem serve`.")] = "127.0.0.1:50051",
           api_key: ApiKeyOpt = None, tls_ca: TlsCaOpt = None) -> None:
    """Pools, workers and their load, from a running server."""
    import grpc

    with _client(server, api_key, tls_ca) as client:
        try:
            info = client.server_info()
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            raise typer.Exit(1) from None
    print(f"tandem {info.version} at {server}: replica {info.replica_id}, {info.deployment_mode}, state in "
          f"{info.state_store}, {info.running_requests} requests running")
    for pool in info.pools:
        for w in pool.workers:
            print(f"  {pool.stage:10s} {w.worker_id:24s} running {w.running_requests:3d}  queued tokens "
                  f"{w.queued_tokens:6d}  KV blocks {w.kv_blocks_used}/{w.kv_blocks_used + w.kv_blocks_free}")


@app.command()
def demo(model: ModelOpt = DEFAULT_MODEL,
         max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 96,
         mode: Annotated[str, typer.Option(help="colocated or disaggregated (local Ray), or embedded.")] = (
             "colocated")) -> None:
    """Start the whole system here, stream answers to a few prompts over gRPC, print speculation statistics."""
    from orchestrator.backend import MODES
    from orchestrator.demo import run_demo

    if mode not in MODES:
        raise typer.BadParameter(f"expected one of {MODES}, got {mode!r}", param_hint="--mode")
    resolve(model)
    run_demo(model, max_tokens, mode)


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
    drafters: Annotated[str, typer.Option(help=(
        "Comma-separated drafters; 'none' is the baseline. NAME:fixed (NAME:fixed=N) verifies max-draft-nodes "
        "(N) of NAME's likeliest nodes every step instead of leaving the amount to goodput control."))] = (
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
    from benchmarks.spec import SpecBenchConfig, parse_entry, run
    from services.spec.registry import check_drafter_name

    names = tuple(d.strip() for d in drafters.split(",") if d.strip())
    for name in names:
        check_drafter_name(parse_entry(name)[0])
    if "none" not in names:
        names = ("none", *names)
    run(SpecBenchConfig(model=model, prompts=prompts, drafters=names, max_new_tokens=max_new_tokens,
                        temperature=temperature, limit=limit, max_nodes=max_draft_nodes, concurrency=concurrency,
                        transformers_baselines=transformers), json_out, _beside(json_out, plot))


@bench_app.command("replay")
def bench_replay(
    model: ModelOpt = DEFAULT_MODEL,
    prompts: Annotated[str, typer.Option(help="JSONL file (`prompt` or `messages` per line) or 'humaneval'.")] = (
        "humaneval"),
    drafters: Annotated[str, typer.Option(help="Comma-separated drafters that learn from tokens only.")] = (
        "ngram,aded,lookahead"),
    budgets: Annotated[str, typer.Option(help="Comma-separated draft nodes per step.")] = "8,16,32",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 128,
    limit: Annotated[int | None, typer.Option(help="Use the first N prompts.")] = 40,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results JSON.")] = Path(
        "benchmarks/results/replay.json"),
    plot: PlotOpt = None,
) -> None:
    """Tokens per step a drafter's trees would accept, by replaying plain greedy outputs (no model)."""
    from benchmarks.replay import ReplayBenchConfig, run

    names = tuple(d.strip() for d in drafters.split(",") if d.strip())
    try:
        sizes = tuple(int(b) for b in budgets.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {budgets!r}",
                                 param_hint="--budgets") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("every budget must be >= 1", param_hint="--budgets")
    run(ReplayBenchConfig(model=model, prompts=prompts, drafters=names, budgets=sizes, max_new_tokens=max_new_tokens,
                          limit=limit), json_out, _beside(json_out, plot))


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


@bench_app.command("serve")
def bench_serve(
    server: Annotated[str, typer.Option(help="HOST:PORT of a running `tandem serve`.")] = "127.0.0.1:50051",
    rates: Annotated[str, typer.Option(help="Comma-separated mean arrival rates (requests/s, Poisson).")] = (
        "0.5,1,2,4"),
    duration: Annotated[float, typer.Option(help="Seconds of arrivals per rate and mode.")] = 60.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 128,
    modes: Annotated[str, typer.Option(help="Speculation modes compared: off, fixed, auto.")] = "off,fixed,auto",
    rounds: Annotated[int, typer.Option(min=1, help=(
        "Times the modes take turns at each rate, every other round reversed (A B, B A: drift "
        "on a shared machine cancels); each mode's figures pool its rounds."))] = 1,
    slo_ttft: Annotated[float, typer.Option(help="Goodput SLO on time to first token (s).")] = 2.0,
    slo_tpot: Annotated[float, typer.Option(help="Goodput SLO on time per output token (s).")] = 0.2,
    seed: Annotated[int, typer.Option(help=(
        "Seeds the arrival schedules and which prompts each mode gets; repeat runs (each on a fresh "
        "server: its drafters remember every answer) with other seeds to see the spread."))] = 0,
    api_key: ApiKeyOpt = None,
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the results JSON.")] = Path(
        "benchmarks/results/serve.json"),
    plot: PlotOpt = None,
) -> None:
    """Poisson arrivals over gRPC: TTFT, TPOT, ITL p50/p99 and goodput, speculation off / fixed / auto."""
    from benchmarks.serve import MODES, ServeBenchConfig, run

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    for m in chosen:
        if m not in MODES:
            raise typer.BadParameter(f"expected some of {tuple(MODES)}, got {m!r}", param_hint="--modes")
    try:
        rate_values = tuple(float(r) for r in rates.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers, got {rates!r}", param_hint="--rates") from None
    if not rate_values or any(r <= 0 for r in rate_values):
        raise typer.BadParameter("rates must be > 0", param_hint="--rates")
    cfg = ServeBenchConfig(server=server, rates=rate_values, duration_s=duration, max_new_tokens=max_new_tokens,
                           modes=chosen, rounds=rounds, slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot, seed=seed,
                           api_key=api_key)
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
