"""Generate the Python gRPC stubs from proto/**/*.proto, beside the .proto files.

The build runs this (setup.py's build_py, and `make` before tests and the demo); the
generated *_pb2*.py files are not in git and are never edited by hand. Needs grpcio-tools.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(root.rglob("*.proto"))


def generate(root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every .proto under `root`; returns the files written. Raises on a protoc error."""
    from importlib.resources import files

    from grpc_tools import protoc

    well_known = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    sources = [str(p.relative_to(root)) for p in proto_files(root)]
    args = ["protoc", f"-I{root}", f"-I{well_known}", f"--python_out={root}", f"--pyi_out={root}",
            f"--grpc_python_out={root}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources} (see the messages above)")
    return sorted(p for p in root.rglob("*_pb2*.py*"))


if __name__ == "__main__":
    written = generate()
    print(f"generated {len(written)} stub files under {PROTO_ROOT}", file=sys.stderr)
