"""Load a model by registered name or path: config, weights on our model, tokenizer.

GGUF files are converted once into a Hugging Face directory under the cache
(`$TANDEM_CACHE_DIR`, default `~/.cache/tandem`), so the second load reads safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.runtime.errors import ModelLoadError
from services.runtime.gguf_convert import convert_gguf
from services.runtime.model.llama import LlamaForCausalLM
from services.runtime.model_config import ModelConfig
from services.runtime.registry import resolve
from services.runtime.tokenizer import Tokenizer

CONVERTER_VERSION = 1


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Tokenizer
    hf_dir: Path  # a Hugging Face directory with the same weights (the reference implementation loads it)
    load_seconds: float


def cache_root() -> Path:
    return Path(os.environ.get("TANDEM_CACHE_DIR", Path.home() / ".cache" / "tandem"))


def hf_directory(name_or_path: str) -> tuple[str, Path]:
    """The model's name and a Hugging Face directory holding it, converting a GGUF file on first use."""
    src = resolve(name_or_path)
    if src.kind == "hf":
        return src.name, src.path
    st = src.path.stat()
    out = cache_root() / "models" / f"{src.path.stem}-{st.st_size}-{st.st_mtime_ns}-v{CONVERTER_VERSION}"
    if not (out / "config.json").is_file():
        # Convert into a private directory, then rename: concurrent loaders never see half a conversion.
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        convert_gguf(src.path, tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return src.name, out


def load_weights(hf_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{hf_dir} has no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(hf_dir / f)).items():
            weights[k] = v.to(dtype)
    return weights


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               pack_weights: bool = True, autotune: bool = True) -> LoadedModel:
    """`pack_weights`: on CPU, prepack projections for oneDNN (kernels/linear.py); no-op elsewhere.
    `autotune`: time the packed kernel against the reference per shape and keep the faster."""
    start = time.perf_counter()
    name, hf_dir = hf_directory(name_or_path)
    cfg = ModelConfig.from_json_file(hf_dir / "config.json")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.rope.reset_tables()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.load_hf_state_dict(load_weights(hf_dir, dtype))
    model.eval()
    if pack_weights:
        model.pack_linear_weights(autotune)
    tokenizer = Tokenizer.from_dir(hf_dir, cfg.eos_token_ids)
    return LoadedModel(name, cfg, model, tokenizer, hf_dir, time.perf_counter() - start)


def load_tokenizer(name_or_path: str) -> tuple[str, ModelConfig, Tokenizer]:
    """The model's name, config and tokenizer, without its weights (a front door that only tokenizes)."""
    name, hf_dir = hf_directory(name_or_path)
    cfg = ModelConfig.from_json_file(hf_dir / "config.json")
    return name, cfg, Tokenizer.from_dir(hf_dir, cfg.eos_token_ids)
