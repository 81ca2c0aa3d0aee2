"""A stage worker: one engine (model, paged KV cache, scheduler, speculator) in a Ray actor.

The deployment drives every worker step by step (one `step()` call is one forward pass) and
carries only metadata in its calls; KV moves worker to worker over torch.distributed pair
groups, formed on demand when two workers first exchange a request. Run alone, an
EngineWorker is the colocated mode: every stage in one process. The prefill and verify
workers extend it with the two halves of a hand-off.
"""

from __future__ import annotations

import torch

from services.runtime.engine import EngineConfig, LLMEngine, Prompt
from services.runtime.request import RequestOutput
from services.runtime.sampling_params import SamplingParams
from services.spec.drafter import Drafter
from services.transfer.pair_group import PairGroups, backend_for
from services.transfer.transport import TorchDistributedTransport
from services.workers.load import WorkerLoad
from services.workers.tracing import WorkerTracer, traced


class EngineWorker:
    stage = "colocated"

    def __init__(self, worker_id: str, config: EngineConfig, torch_threads: int = 1,
                 drafter: Drafter | None = None) -> None:
        torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        self.tracer = WorkerTracer(worker_id, self.stage)
        self.engine = LLMEngine(config, drafter=drafter)
        self.pairs = PairGroups(worker_id, backend_for(config.device))
        self.transport = TorchDistributedTransport(self.pairs)

    def ready(self) -> str:
        return self.worker_id

    def tokenize(self, prompt: Prompt) -> list[int]:
        return self.engine.tokenize(prompt)

    @traced("tandem.worker.add", per_request=True)
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.engine.add_request(prompt_ids, params, request_id, seed=seed)

    @traced("tandem.worker.step")
    def step(self) -> list[RequestOutput]:
        return self.engine.step() if self.engine.has_unfinished_requests() else []

    def flush_traces(self) -> bool:
        return self.tracer.flush()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def load(self) -> WorkerLoad:
        return WorkerLoad.of_engine(self.engine, self.worker_id, self.stage)

    def leaked_blocks(self) -> list[int]:
        """Blocks still referenced although no request is in the worker (should be none)."""
        if self.engine.requests or self.engine.handoffs:
            return []
        return [b.block_id for b in self.engine.block_manager.blocks if b.ref_count]

    def speculation_stats(self) -> dict[str, float]:
        return self.engine.speculation_counters()

    # --- pair groups (the KV data plane) ---------------------------------------------------------
    def open_pair(self, peer_id: str) -> str:
        return self.pairs.open(peer_id)

    def join_pair(self, peer_id: str, address: str, rank: int) -> None:
        self.pairs.join(peer_id, address, rank)

    def close_pair(self, peer_id: str) -> bool:
        return self.pairs.close(peer_id)

    def pair_peers(self) -> list[str]:
        return self.pairs.peers()
