"""What a worker reports about its load: the router picks replicas by it, operators scale by it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.runtime.engine import LLMEngine


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    stage: str
    running: int  # requests in the running batch
    waiting: int  # requests queued, not yet admitted
    queued_tokens: int  # tokens still to compute: unprefilled prompt tokens of every request
    used_blocks: int
    free_blocks: int
    held_handoffs: int = 0  # prefilled requests whose KV waits to be sent
    pending_kv: int = 0  # admitted requests whose KV has not arrived yet

    @classmethod
    def of_engine(cls, engine: LLMEngine, worker_id: str, stage: str) -> WorkerLoad:
        queued = sum(r.num_tokens - r.num_computed_tokens for r in engine.requests.values())
        return cls(worker_id, stage, running=len(engine.scheduler.running), waiting=len(engine.scheduler.waiting),
                   queued_tokens=queued, used_blocks=engine.block_manager.num_used_blocks,
                   free_blocks=engine.block_manager.num_free_blocks, held_handoffs=len(engine.handoffs),
                   pending_kv=len(engine.pending_kv))

    @property
    def unfinished(self) -> int:
        return self.running + self.waiting + self.held_handoffs + self.pending_kv

    def sort_key(self) -> tuple[int, int, int]:
        """Less loaded first: fewer tokens to compute, then more free blocks."""
        return (self.queued_tokens, self.running + self.waiting, -self.free_blocks)
