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
def test_generate_streams_raw_prompt_with_seed():
    args = ("generate", "--prompt", "def add(a, b):", "--max-tokens", "8", "--temperature", "0.9", "--seed", "5")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "tokens/s" in first.stderr


@pytest.mark.parametrize("args,message", [
    (("generate",), "exactly one of --prompt or --messages-file"),
    (("generate", "--prompt", "hi", "--model", "no-such-model"), "unknown model 'no-such-model'"),
    (("generate", "--prompt", "hi", "--max-tokens", "0"), "max_tokens: expected an integer >= 1"),
    (("generate", "--prompt", "hi", "--top-p", "2"), "top_p: expected a number in (0, 1]"),
    (("generate", "--messages-file", "/nonexistent.json"), "does not exist"),
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
    out, plot = tmp_path / "spec.json", tmp_path / "spec.png"
    proc = run("bench", "spec", "--prompts", str(prompts), "--drafters", "none,ngram,auto", "--max-new-tokens", "16",
               "--no-transformers", "--json", str(out), "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 2 and plot.stat().st_size > 0
    for name in ("none", "ngram", "auto"):
        row = result["drafters"][name]
        assert {"tokens_per_s", "speedup_vs_none", "mean_accepted_tokens", "draft_ms", "verify_ms"} <= set(row)
        assert row["identical_to_none"] == "2/2" and row["tokens"] == result["drafters"]["none"]["tokens"] > 0
        assert row["mean_accepted_tokens"] >= 1.0
    assert result["drafters"]["none"]["speedup_vs_none"] == 1.0
