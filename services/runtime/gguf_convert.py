"""Convert a GGUF file into a Hugging Face directory (config.json, safetensors, tokenizer).

Run once per file; the loader caches the result, so later loads read safetensors in
seconds. Quantized tensors are dequantized to float32. llama.cpp stores the q/k
projections of "llama"-architecture models permuted for its interleaved RoPE; they are
permuted back to the rotate-half layout that Hugging Face checkpoints (and our model) use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from services.runtime.errors import ModelLoadError

# GGUF architecture -> (HF architecture, model_type, whether q/k were permuted by llama.cpp)
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart that Tandem knows")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleave of the rotary halves (rows of q_proj / k_proj)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; expected one of {sorted(_ARCHS)}")
    hf_arch, model_type, _ = _ARCHS[arch]
    tensor_names = {t.name for t in reader.tensors}
    n_vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(n_vocab),
        "hidden_size": int(_field(reader, f"{arch}.embedding_length")),
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    if model_type == "mistral":
        cfg["sliding_window"] = None
    return cfg


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files to out_dir."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:  # the gguf package raises bare ValueErrors and struct errors on bad files
        raise ModelLoadError(f"{gguf_path} is not a readable GGUF file: {e}") from e
    cfg = gguf_config(reader)
    arch = _field(reader, "general.architecture")
    permuted = _ARCHS[arch][2]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor"):
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        if permuted and ".attn_q." in t.name:
            w = _unpermute(w, heads)
        elif permuted and ".attn_k." in t.name:
            w = _unpermute(w, kv_heads)
        tensors[_hf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(gguf_path, out_dir, cfg)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _save_tokenizer(gguf_path: Path, out_dir: Path, cfg: dict) -> None:
    """Transformers builds a fast tokenizer (and chat template) from the GGUF vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))
    # Transformers may resolve the special tokens differently from the raw GGUF fields.
    if tok.eos_token_id is not None:
        cfg["eos_token_id"] = tok.eos_token_id
    if tok.bos_token_id is not None:
        cfg["bos_token_id"] = tok.bos_token_id
