"""The verify stage: takes requests another worker prefilled — reserves blocks for their
prompt KV, receives it, then decodes them (drafting, verifying trees, accepting) in its
continuous batch. It can also prefill by itself: a request it must recompute after
preemption, or one sent to it whole.

Its drafter runs in-process, or — given a draft worker — on the draft pool, asked for trees
through a RemoteDrafter once per step.
"""

from __future__ import annotations

import dataclasses

import ray

from services.runtime.engine import EngineConfig
from services.runtime.sampling_params import SamplingParams
from services.transfer.kv_transfer import recv_kv
from services.workers.engine_worker import EngineWorker
from services.workers.remote_drafter import RemoteDrafter
from services.workers.tracing import traced


class VerifyWorker(EngineWorker):
    stage = "verify"

    def __init__(self, worker_id: str, config: EngineConfig, torch_threads: int = 1,
                 draft_worker: ray.actor.ActorHandle | None = None) -> None:
        remote = None
        if draft_worker is not None:
            name, candidates, can_draft_ahead = ray.get(draft_worker.describe.remote())
            ahead = can_draft_ahead and config.speculation.draft_ahead
            remote = RemoteDrafter(draft_worker, name, candidates, draft_ahead=ahead,
                                   pre_verify=ahead and config.speculation.pre_verify)
        self.remote_drafter = remote
        super().__init__(worker_id, config, torch_threads, drafter=remote)

    @traced("tandem.worker.step")
    def step(self):
        outputs = super().step()
        if self.remote_drafter is not None:
            self.remote_drafter.flush()  # this step's observations and releases, not waited for
        return outputs

    def draft_stats(self) -> dict[str, float]:
        """PEARL's overlap, seen from here: drafts taken from the look-ahead, time spent waiting."""
        return dataclasses.asdict(self.remote_drafter.stats) if self.remote_drafter is not None else {}

    def abort(self, request_id: str) -> bool:
        aborted = super().abort(request_id)
        if self.remote_drafter is not None:
            self.remote_drafter.flush()
        return aborted

    @traced("tandem.worker.reserve", per_request=True)
    def reserve(self, request_id: str, prompt_ids: list[int], first_token: int, params: SamplingParams,
                seed: int) -> int:
        """Admit a prefilled request and allocate its prompt's blocks; returns how many.
        Raises ResourceExhaustedError when they do not fit (the router tries elsewhere)."""
        return len(self.engine.add_prefilled(request_id, prompt_ids, first_token, params, seed))

    @traced("tandem.kv.receive", per_request=True)
    def receive_kv(self, request_id: str, peer_id: str, timeout_s: float) -> None:
        """Receive the prompt KV from the prefill peer into the reserved blocks, then decode.
        On failure the reservation is dropped, so nothing stays held."""
        req = self.engine.pending_kv[request_id]
        try:
            recv_kv(self.transport, peer_id, self.engine.kv_cache.layers, req.block_table).wait(timeout_s)
        except BaseException:
            self.engine.abort(request_id)
            raise
        self.engine.activate(request_id)
