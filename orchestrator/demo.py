"""`tandem demo`: the bundled model answering a few prompts, one by one and then batched."""

from __future__ import annotations

import time

from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three tips for writing clear documentation.",
]


def run_demo(model: str, max_tokens: int) -> None:
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=model, speculation=SpecConfig(drafter="auto")))
    cfg = engine.model_config
    print(f"Loaded {engine.loaded.name} ({cfg.describe()}) in {time.perf_counter() - t0:.1f}s; "
          f"KV cache: {engine.block_manager.num_blocks} blocks of {engine.config.block_size} tokens.\n")
    params = SamplingParams(max_tokens=max_tokens)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]

    alone = []
    for chat in chats:
        print(f">>> {chat[0]['content']}")
        start = time.perf_counter()
        tokens: list[int] = []
        for out in engine.stream(chat, params):
            print(out.new_text, end="", flush=True)
            tokens = out.token_ids
        dt = time.perf_counter() - start
        alone.append(tokens)
        print(f"\n[{len(tokens)} tokens in {dt:.1f}s: {len(tokens) / dt:.1f} tokens/s]\n")

    start = time.perf_counter()
    outs = engine.generate(chats, params)
    dt = time.perf_counter() - start
    total = sum(len(o.token_ids) for o in outs)
    same = all(o.token_ids == a for o, a in zip(outs, alone))
    print(f"All {len(chats)} prompts again, batched together: {total} tokens in {dt:.1f}s = "
          f"{total / dt:.1f} tokens/s; answers identical to the one-by-one run: {'yes' if same else 'NO'}.")
    st = engine.speculator.stats
    print(f"Speculation (drafter auto, lossless): {engine.stats.decode_tokens / max(1, engine.stats.decode_steps):.2f} "
          f"tokens per decode step; {st.drafts} drafted steps, {st.accepted_tokens} of {st.draft_tokens} draft "
          f"tokens accepted ({100 * st.acceptance_rate:.0f}%).")
