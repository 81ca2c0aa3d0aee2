"""What the orchestrator serves from: a step loop plus what it must know about the model.

`embedded`: one engine in the orchestrator's process (the lightest way to serve; tests).
`colocated` / `disaggregated`: a deployment of stage workers on a Ray cluster (local by default).
The orchestrator reaches either only through the step loop's interface (add, step, abort) and
the workers' load reports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.cluster.config import DeploymentConfig
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.step_loop import StepLoop
from services.runtime.tokenizer import Tokenizer
from services.workers.load import WorkerLoad

MODES = ("embedded", "colocated", "disaggregated")


@dataclass(frozen=True)
class ModelCard:
    name: str
    max_model_len: int
    vocab_size: int
    drafter: str  # the drafter the server runs ("none": plain decoding)


@dataclass(frozen=True)
class Snapshot:
    """The backend's state at one moment: what GetServerInfo and the metrics report."""

    loads: list[WorkerLoad]
    speculation: dict[str, float]
    transfer: dict[str, float]  # KV transfers between workers: transfers, bytes, seconds, failures


@dataclass
class Backend:
    mode: str
    loop: StepLoop
    tokenizer: Tokenizer
    model: ModelCard
    block_size: int

    def kv_capacity_tokens(self, snapshot: Snapshot) -> int:
        """Tokens of KV the workers that decode can hold (the prefill pool only holds prompts briefly)."""
        decoding = [w for w in snapshot.loads if w.stage in ("colocated", "verify")]
        return sum(w.used_blocks + w.free_blocks for w in decoding) * self.block_size

    def load(self) -> list[WorkerLoad]:
        """Each worker's load; call on the engine driver's thread (it reads the engine's state)."""
        if isinstance(self.loop, LLMEngine):
            return [WorkerLoad.of_engine(self.loop, "embedded", "colocated")]
        return self.loop.load()

    def speculation(self) -> dict[str, float]:
        """Speculation counters summed over the workers that verify (driver thread, as load())."""
        if isinstance(self.loop, LLMEngine):
            return self.loop.speculation_counters()
        total: dict[str, float] = {}
        for stage in self.loop.pools:
            if stage == "draft":  # draft workers propose; the counters live where drafts are verified
                continue
            for worker_id in self.loop.workers(stage):
                for k, v in self.loop.call(worker_id, "speculation_stats").items():
                    total[k] = total.get(k, 0) + v
        return total

    def transfer(self) -> dict[str, float]:
        stats = getattr(self.loop, "transfer", None)
        return dataclasses.asdict(stats) if stats is not None else {"transfers": 0, "bytes": 0, "seconds": 0.0,
                                                                    "failures": 0}

    def snapshot(self) -> Snapshot:
        """Driver thread only."""
        return Snapshot(self.load(), self.speculation(), self.transfer())

    def shutdown(self) -> None:
        shutdown = getattr(self.loop, "shutdown", None)
        if shutdown is not None:
            shutdown()


def embedded_backend(engine: LLMEngine) -> Backend:
    card = ModelCard(engine.loaded.name, engine.max_model_len, engine.model_config.vocab_size,
                     engine.config.speculation.drafter)
    return Backend("embedded", engine, engine.loaded.tokenizer, card, engine.config.block_size)


def start_backend(mode: str, engine: EngineConfig, deployment: DeploymentConfig | None = None) -> Backend:
    """Load the model (embedded) or start the stage pools; `deployment` overrides `engine` when given."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "embedded":
        return embedded_backend(LLMEngine(engine))
    from services.cluster.deployment import Deployment
    from services.runtime.loader import load_tokenizer

    cfg = deployment or DeploymentConfig(mode=mode, engine=engine)
    if cfg.mode != mode:
        cfg = dataclasses.replace(cfg, mode=mode)
    name, model_cfg, tokenizer = load_tokenizer(cfg.engine.model)
    d = Deployment(cfg)
    max_len = min(cfg.engine.max_model_len or model_cfg.effective_context, model_cfg.effective_context)
    card = ModelCard(name, max_len, model_cfg.vocab_size, cfg.engine.speculation.drafter)
    return Backend(mode, d, tokenizer, card, cfg.engine.block_size)
