"""The prefill stage: runs prompts (chunked, prefix-cached), samples each first token, and
holds the prompt's KV — leased, so a decode peer that never comes cannot strand it — until it
has been sent to the verify worker the deployment chose."""

from __future__ import annotations

from services.runtime.sampling_params import SamplingParams
from services.transfer.kv_transfer import send_kv
from services.workers.engine_worker import EngineWorker
from services.workers.tracing import traced


class PrefillWorker(EngineWorker):
    stage = "prefill"

    @traced("tandem.worker.add", per_request=True)
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int) -> None:
        self.engine.add_request(prompt_ids, params, request_id, seed=seed, hand_off=True)

    @traced("tandem.worker.step")
    def step(self):
        self.engine.expire_handoffs()
        return super().step()

    @traced("tandem.kv.send", per_request=True)
    def send_kv(self, request_id: str, peer_id: str, timeout_s: float) -> int:
        """Push the request's prompt KV into the blocks the peer reserved; returns bytes sent.
        The held blocks are freed whether or not the transfer succeeds."""
        held = self.engine.take_handoff(request_id)
        try:
            layers = self.engine.kv_cache.layers
            send_kv(self.transport, peer_id, layers, held.block_table).wait(timeout_s)
            k = layers[0][0]
            return 2 * len(layers) * len(held.block_table) * k[0].numel() * k.element_size()
        finally:
            self.engine.release_handoff(request_id)

    def drop_handoff(self, request_id: str) -> bool:
        return self.engine.release_handoff(request_id)
