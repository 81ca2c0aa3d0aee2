"""Our model's logits equal Hugging Face transformers' on the same weights (fp32, max abs diff <= 1e-3),
over a prompt and several decode steps, through the paged KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.runtime.kv_cache import KVCache
from services.runtime.loader import load_model
from services.runtime.model_runner import ModelRunner, SeqInput
from tests.conftest import make_tiny_hf_dir

TOL = 1e-3


def run_and_compare(loaded, ref, prompt: list[int], decode_steps: int, block_size: int = 4) -> float:
    """Prefill `prompt`, then decode greedily; compare every step's logits with the reference's."""
    kv = KVCache.allocate(loaded.config, num_blocks=64, block_size=block_size, dtype=torch.float32)
    runner = ModelRunner(loaded.model, kv)
    table = list(range(63, -1, -1))  # non-contiguous, descending blocks: the paging must not matter
    out = runner.forward([SeqInput(prompt, 0, table, logits="all")])
    with torch.no_grad():
        expected = ref(torch.tensor([prompt])).logits[0]
    worst = (out.logits[0] - expected).abs().max().item()
    seq = list(prompt)
    for _ in range(decode_steps):
        seq.append(int(out.logits[0][-1].argmax()))
        out = runner.forward([SeqInput(seq[-1:], len(seq) - 1, table)])
        with torch.no_grad():
            expected = ref(torch.tensor([seq])).logits[0, -1:]
        worst = max(worst, (out.logits[0] - expected).abs().max().item())
    return worst


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("qwen2", {}),
    ("mistral", {}),
])
def test_tiny_random_models_match(tmp_path, smollm2_dir, arch, overrides):
    d = make_tiny_hf_dir(tmp_path / arch, smollm2_dir, arch=arch, **overrides)
    ours = load_model(str(d))
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    prompt = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    assert run_and_compare(ours, ref, prompt, decode_steps=8) <= TOL


def test_sharded_checkpoint_loads(tmp_path, smollm2_dir):
    d = make_tiny_hf_dir(tmp_path / "sharded", smollm2_dir, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file()
    ours = load_model(str(d))
    ref = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    assert run_and_compare(ours, ref, list(range(3, 40)), decode_steps=4) <= TOL


@pytest.mark.model
def test_smollm2_matches_transformers_from_gguf(smollm2, hf_from_gguf):
    """The reference loads the GGUF with transformers' own converter, independent of ours."""
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colours."}])
    assert run_and_compare(smollm2, hf_from_gguf, prompt, decode_steps=6, block_size=16) <= TOL


def test_captured_hidden_states_match_transformers(tiny, tiny_dir):
    """`capture` returns chosen layers' outputs: transformers' hidden_states[i + 1] for layer i."""
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    prompt = list(range(7, 30))
    kv = KVCache.allocate(tiny.config, num_blocks=16, block_size=4, dtype=torch.float32)
    out = ModelRunner(tiny.model, kv).forward([SeqInput(prompt, 0, list(range(8)), logits="none")],
                                              capture=frozenset({0, 1}))
    with torch.no_grad():
        hs = ref(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    assert set(out.hidden) == {0, 1}
    for layer in (0, 1):
        assert (out.hidden[layer] - hs[layer + 1][0]).abs().max().item() <= TOL
