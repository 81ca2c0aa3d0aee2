"""What a deployment runs: its mode, its pools and the engine every worker builds.

The same dataclasses load from a YAML file (`DeploymentConfig.from_yaml`), keys named as the
fields; nested sections (`engine`, `engine.speculation`, `prefill`, ...) map to the nested
dataclasses, and a key that names no field is an error that names it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from services.runtime.engine import EngineConfig
from services.spec.registry import placement_of

Mode = Literal["colocated", "disaggregated"]
MODES = ("colocated", "disaggregated")


@dataclass(frozen=True)
class PoolConfig:
    replicas: int = 1
    num_cpus: float = 1.0
    """Ray CPUs per worker; also its torch threads (at least one)."""
    num_gpus: float = 0.0
    """GPUs per worker, kept together on one node by a placement group."""
    ranks: int = 1
    """Processes per worker, each with num_cpus/num_gpus, in one placement group. Draft pool only:
    a draft worker with ranks > 1 runs EasySpec's parallel layer groups across them."""

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"replicas must be >= 0, got {self.replicas}")
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.num_cpus))


@dataclass(frozen=True)
class DeploymentConfig:
    mode: Mode = "colocated"
    engine: EngineConfig = EngineConfig()
    """Built by every worker; its speculation runs where the tree is verified."""
    colocated: PoolConfig = PoolConfig()
    prefill: PoolConfig = PoolConfig()
    verify: PoolConfig = PoolConfig()
    draft: PoolConfig = PoolConfig()
    """Started in disaggregated mode when the drafter's placement is the draft pool."""
    ray_address: str | None = None
    """An existing Ray cluster ("auto", "ray://host:10001"); None starts a local one."""
    handoff_timeout_s: float = 60.0
    """Longest a KV transfer between two workers may take before it counts as failed."""
    pair_idle_timeout_s: float = 300.0
    """A pair group no KV transfer used for this long is closed on both sides (formed again on need)."""
    otlp_endpoint: str | None = None
    """An OTLP/gRPC collector the workers export their spans to (services/workers/tracing.py);
    `tandem serve` fills it from its own tracing config."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        for stage in self.stages:
            if self.pool(stage).replicas < 1:
                raise ValueError(f"{self.mode} mode needs at least one {stage} worker")
        for stage in ("colocated", "prefill", "verify"):
            if self.pool(stage).ranks != 1:
                raise ValueError(f"{stage}.ranks must be 1: only draft workers span several ranks")
        spec = self.engine.speculation
        if self.draft.ranks > 1 and "draft" in self.stages and not (
                spec.drafter == "easyspec" and spec.draft_model and spec.parallel_group > 1):
            raise ValueError("draft.ranks > 1 splits EasySpec's parallel layer groups across ranks: it needs "
                             "drafter 'easyspec' with a draft_model and parallel_group > 1")

    @property
    def stages(self) -> tuple[str, ...]:
        """The pools this deployment runs, the entry stage first (draft pools start before the
        verify workers that use them)."""
        if self.mode == "colocated":
            return ("colocated",)  # one worker runs every stage: the reference
        if self.engine.speculation.drafter != "none" and placement_of(self.engine.speculation) == "draft":
            return ("prefill", "draft", "verify")
        return ("prefill", "verify")

    def pool(self, stage: str) -> PoolConfig:
        return getattr(self, stage)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentConfig:
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentConfig:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of deployment settings at the top level")
        return cls.from_dict(data)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """A dataclass from a mapping, recursing into dataclass-typed fields; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in names:
            raise ValueError(f"unknown setting {path!r}; expected one of {sorted(names)}")
        kind = _dataclass_in(hints[key])
        if kind is not None and isinstance(value, dict):
            value = _build(kind, value, f"{path}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where.rstrip('.') or 'deployment'}: {e}") from e


def _dataclass_in(hint: Any) -> type | None:
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)
    return None
