"""The `tandem` command line, run as a user would (a subprocess, real model weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TANDEM = [sys.executable, "-m", "orchestrator.cli"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*TANDEM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.model
def test_generate_json_matches_engine(smollm2, make_engine, tmp_path):
    messages = [{"role": "user", "content": "Name a fruit that is yellow."}]
    f = tmp_path / "messages.json"
    f.write_text(json.dumps(messages))
    proc = run("generate", "--messages-file", str(f), "--max-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "token_ids", "prompt_tokens", "tokens_per_s"}
    engine = make_engine(smollm2, num_kv_blocks=64)
    from services.runtime.sampling_params import SamplingParams

    expected = engine.generate([messages], SamplingParams(max_tokens=12))[0]
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["prompt_tokens"] == len(engine.tokenize(messages)) and out["tokens_per_s"] > 0


@pytest.mark.model
def test_generate_streams_raw_prompt_with_seed(smollm2, make_engine):
    """A seeded sampled run streams the tokens the engine samples for that seed (randomness is
    keyed by seed and position), so it is reproducible."""
    from services.runtime.sampling_params import SamplingParams

    proc = run("generate", "--prompt", "def add(a, b):", "--max-tokens", "8", "--temperature", "0.9", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    expected = make_engine(smollm2, num_kv_blocks=64).generate(
        ["def add(a, b):"], SamplingParams(max_tokens=8, temperature=0.9, seed=5))[0]
    assert proc.stdout.rstrip("\n") == expected.text and expected.text.strip()
    assert "tokens/s" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (("generate",), "exactly one of --prompt or --messages-file"),
    (("generate", "--prompt", "hi", "--model", "no-such-model"), "unknown model 'no-such-model'"),
    (("generate", "--prompt", "hi", "--max-tokens", "0"), "max_tokens: expected an integer >= 1"),
    (("generate", "--prompt", "hi", "--top-p", "2"), "top_p: expected a number in (0, 1]"),
    (("generate", "--messages-file", "/nonexistent.json"), "does not exist"),
    (("bench", "spec", "--drafters", "auto:sometimes"), "'auto:sometimes': expected a drafter name, NAME:fixed"),
])
def test_bad_arguments_get_clear_errors(args, message):
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.model
def test_bench_spec_writes_every_field_the_issue_names(smollm2, tmp_path):
    """A tiny `tandem bench spec` run (a JSONL with a raw and a chat prompt): the JSON rows and
    the plot exist, and greedy speculation reproduced plain decoding on both prompts."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n    return a + b\n\ndef add("}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Count to ten."}]}) + "\n")
    out, plot = tmp_path / "spec.json", tmp_path / "spec.png"  # the plot goes beside the JSON by default
    proc = run("bench", "spec", "--prompts", str(prompts), "--drafters", "none,ngram,auto,auto:fixed=8",
               "--max-new-tokens", "16",
               "--no-transformers", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 2 and plot.stat().st_size > 0
    for name in ("none", "ngram", "auto", "auto:fixed=8"):
        row = result["drafters"][name]
        assert {"tokens_per_s", "speedup_vs_none", "mean_accepted_tokens", "draft_ms", "verify_ms"} <= set(row)
        assert row["identical_to_none"] == "2/2" and row["tokens"] == result["drafters"]["none"]["tokens"] > 0
        assert row["mean_accepted_tokens"] >= 1.0
    assert result["drafters"]["none"]["speedup_vs_none"] == 1.0
    assert result["drafters"]["auto:fixed=8"]["drafted_step_share"] > 0  # every request drafts, no gate


@pytest.mark.model
def test_bench_replay_writes_mat_per_drafter_and_budget(smollm2, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def add(a, b):\n    return a + b\n\ndef add("}) + "\n")
    out = tmp_path / "replay.json"
    proc = run("bench", "replay", "--prompts", str(prompts), "--drafters", "ngram,lookahead", "--budgets", "4,8",
               "--max-new-tokens", "16", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["drafters"]) == {"ngram", "lookahead"} and out.with_suffix(".png").stat().st_size > 0
    for rows in result["drafters"].values():
        assert set(rows) == {"4", "8"}
        assert all(r["mean_accepted_tokens"] >= 1.0 and r["decode_steps"] > 0 for r in rows.values())
    refused = run("bench", "replay", "--prompts", str(prompts), "--drafters", "token-recycling", "--json", str(out))
    assert refused.returncode == 2 and "learns from the target's logits" in refused.stderr, refused.stderr


@pytest.mark.model
def test_bench_disagg_and_kv_transfer_write_their_fields(smollm2, tiny_dir, tmp_path):
    """Small runs of the two disaggregation benchmarks (a real Ray cluster, real gloo
    transfers): each writes its JSON and plot with the fields it promises."""
    out, plot = tmp_path / "disagg.json", tmp_path / "disagg.png"
    proc = run("bench", "disagg", "--decode-requests", "2", "--long-prompts", "2", "--long-prompt-tokens", "64",
               "--max-new-tokens", "6", "--json", str(out), "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert plot.stat().st_size > 0
    assert list(result["modes"]) == ["colocated", "disaggregated"]  # `--draft-model` adds the PEARL runs
    for mode in result["modes"].values():
        for kind in ("decode", "long prompt"):
            assert mode[kind]["requests"] == 2
            assert 0 < mode[kind]["ttft_p50_s"] <= mode[kind]["ttft_p99_s"]
            assert 0 < mode[kind]["tpot_p50_s"] <= mode[kind]["tpot_p99_s"]
    assert result["modes"]["disaggregated"]["transfer"]["transfers"] >= 4
    assert result["decode_tpot_p99_ratio_disagg_vs_colocated"] > 0

    out, plot = tmp_path / "kv.json", tmp_path / "kv.png"
    proc = run("bench", "kv-transfer", "--model", str(tiny_dir), "--prompt-tokens", "64,128", "--repeats", "3",
               "--json", str(out), "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert plot.stat().st_size > 0 and result["verified"] is True
    ratios = [p["ratio_vs_raw"] for p in result["prompts"]]
    assert [p["prompt_tokens"] for p in result["prompts"]] == [64, 128]
    assert result["ratio_vs_raw"] == min(ratios) > 0


@pytest.mark.model
def test_generate_through_a_disaggregated_deployment_matches_one_process(smollm2, make_engine, tmp_path):
    """`--deployment` starts a local Ray cluster with prefill and verify workers; a YAML config
    sets the pools. Its greedy output equals the in-process engine's."""
    from services.runtime.sampling_params import SamplingParams

    config = tmp_path / "deployment.yaml"
    config.write_text("mode: colocated\nengine:\n  num_kv_blocks: 64\n  speculation:\n    drafter: ngram\n"
                      "prefill:\n  num_cpus: 0\nverify:\n  num_cpus: 0\n")
    remote = run("generate", "--prompt", "def fib(n):", "--max-tokens", "16", "--json",
                 "--deployment", "disaggregated", "--config", str(config))
    assert remote.returncode == 0, remote.stderr
    got = json.loads(remote.stdout)
    want = make_engine(smollm2, num_kv_blocks=64).generate(["def fib(n):"], SamplingParams(max_tokens=16))[0]
    assert got["token_ids"] == want.token_ids and got["text"] == want.text
    assert got["deployment"] == "disaggregated" and got["drafter"] == "ngram"


def test_a_bad_deployment_config_names_the_setting(tmp_path):
    config = tmp_path / "deployment.yaml"
    config.write_text("mode: disaggregated\nverify:\n  replicas: 0\n")
    proc = run("generate", "--prompt", "hi", "--config", str(config))
    assert proc.returncode != 0 and "at least one verify worker" in _unboxed(proc.stderr)
    config.write_text("engine:\n  speculation:\n    drafterr: ngram\n")
    proc = run("generate", "--prompt", "hi", "--config", str(config))
    assert proc.returncode != 0 and "engine.speculation.drafterr" in _unboxed(proc.stderr)


def _unboxed(text: str) -> str:
    """The words of a message that the CLI printed wrapped inside a box."""
    return " ".join(w for w in text.split() if w not in "│╭╮╰╯─")


def test_serve_then_generate_and_status_over_grpc(smollm2_dir, tmp_path):
    """`tandem serve` in its own process; `tandem generate --server` and `tandem status` against it;
    SIGTERM drains and exits cleanly. (A tiny random model with the real tokenizer's vocabulary.)"""
    import signal

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.conftest import make_tiny_hf_dir
    from tests.redis_server import free_port

    model_dir = make_tiny_hf_dir(tmp_path / "tiny-full-vocab", smollm2_dir, vocab_size=49152, num_hidden_layers=2)
    port = free_port()
    server = subprocess.Popen([*TANDEM, "serve", "--model", str(model_dir), "--port", str(port), "--drafter", "ngram",
                               "--metrics-port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc = run("generate", "--server", f"127.0.0.1:{port}", "--prompt", "Hello", "--max-tokens", "6", "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert len(out["token_ids"]) == 6 and out["finish_reason"] == "length" and out["prompt_tokens"] > 0
        proc = run("generate", "--server", f"127.0.0.1:{port}", "--prompt", "Hello", "--top-p", "2")
        assert proc.returncode == 1 and "INVALID_ARGUMENT: sampling.top_p" in proc.stderr, proc.stderr
        proc = run("status", "--server", f"127.0.0.1:{port}")
        assert proc.returncode == 0, proc.stderr
        assert "embedded" in proc.stdout and "KV blocks 0/" in proc.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "draining" in err
