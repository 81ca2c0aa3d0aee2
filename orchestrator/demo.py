"""`tandem demo` (`make demo`): the whole system on this machine, used as a client would use it.

It starts the orchestrator with a colocated deployment on a local Ray cluster (the bundled
model, in-memory request state), streams answers to a few prompts over gRPC, asks them all
again at once, prints the server's speculation statistics, and stops.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from orchestrator.client import TandemClient, build_request
from orchestrator.server import ServerConfig
from orchestrator.server_thread import ServerThread
from services.runtime.engine import EngineConfig
from services.spec.config import SpecConfig

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three tips for writing clear documentation.",
]


def run_demo(model: str, max_tokens: int, mode: str = "colocated") -> None:
    t0 = time.perf_counter()
    print(f"Starting Tandem ({mode} on a local Ray cluster, drafter auto, request state in memory)...", flush=True)
    config = ServerConfig(port=0, mode=mode, engine=EngineConfig(model=model, speculation=SpecConfig(drafter="auto")))
    running = ServerThread(config)
    print(f"Serving {running.server.backend.model.name} over gRPC at {running.address} "
          f"(ready in {time.perf_counter() - t0:.1f}s).\n", flush=True)
    try:
        with TandemClient(running.address) as client:
            _converse(client, max_tokens)
    finally:
        running.stop(drain_s=2.0)
    print("Stopped.")


def _converse(client: TandemClient, max_tokens: int) -> None:
    requests = [build_request(messages=[{"role": "user", "content": p}], max_tokens=max_tokens) for p in PROMPTS]
    alone = []
    for prompt, request in zip(PROMPTS, requests):
        print(f">>> {prompt}")
        start = time.perf_counter()
        tokens: list[int] = []
        for message in client.stream(request):
            if message.HasField("chunk"):
                print(message.chunk.text, end="", flush=True)
                tokens += message.chunk.token_ids
        dt = time.perf_counter() - start
        alone.append(tokens)
        print(f"\n[{len(tokens)} tokens in {dt:.1f}s: {len(tokens) / dt:.1f} tokens/s]\n")

    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(client.generate, requests))
    dt = time.perf_counter() - start
    total = sum(len(r.token_ids) for r in together)
    same = all(r.token_ids == a for r, a in zip(together, alone))
    print(f"All {len(requests)} prompts again, as {len(requests)} concurrent gRPC streams: {total} tokens in "
          f"{dt:.1f}s = {total / dt:.1f} tokens/s; answers identical to the one-by-one run: {'yes' if same else 'NO'}.")
    s = client.server_info().speculation
    print(f"Speculation (drafter {s.drafter}, lossless): {s.mean_accepted_tokens:.2f} tokens per decode step; "
          f"{s.drafts} drafted steps, {s.accepted_tokens} of {s.draft_tokens} draft tokens accepted "
          f"({100 * s.acceptance_rate:.0f}%).")
