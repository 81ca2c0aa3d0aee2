"""Moving one request's KV blocks between workers: pack, send, receive, unpack.

Protocol (the control plane carries only `KVTransferMeta`):
  1. the receiver allocates its blocks first (so a transfer never waits on memory it may not get)
     and reports their ids;
  2. both workers get the metadata; the receiver calls `recv_kv`, the sender `send_kv`, with the
     same peer order as any other transfer between them (see transport.py);
  3. each waits on its handle; a `TransferError` means the receiver frees its blocks (abort).

The blocks move in chunks of whole layers: the sender packs chunk i + 1 while chunk i is on
the wire, and the receiver unpacks chunk i while chunk i + 1 arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.kv_pack import KVLayers, pack_blocks, packed_shape, unpack_blocks
from services.transfer.transport import HandleGroup, TransferHandle, Transport

# Big enough that per-message cost stays small (gloo pays a notification round trip per
# message: 64-256 KiB chunks ran 3-7x slower on the CPU benchmark machine), small enough that
# packing, the wire and unpacking overlap where a core or a GPU copy engine is free.
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class KVTransferMeta:
    """One request's KV transfer, as the control plane sends it to both workers: metadata only."""

    request_id: str
    src_block_ids: tuple[int, ...]
    """The sender's blocks, in the request's order."""
    dst_block_ids: tuple[int, ...]
    """The receiver's blocks (already allocated), one per sender block."""
    num_layers: int
    block_shape: tuple[int, ...]
    """(block_size, kv_heads, head_dim) of one block of K (or V) in one layer."""
    dtype: str
    """torch dtype name, e.g. "float32"."""
    layers_per_chunk: int
    """Layers per message; both sides must use the same."""

    def __post_init__(self) -> None:
        if len(self.src_block_ids) != len(self.dst_block_ids):
            raise ValueError(f"request {self.request_id}: {len(self.src_block_ids)} sender blocks but "
                             f"{len(self.dst_block_ids)} receiver blocks")
        if self.num_layers < 1 or self.layers_per_chunk < 1:
            raise ValueError(f"request {self.request_id}: num_layers and layers_per_chunk must be >= 1, got "
                             f"{self.num_layers} and {self.layers_per_chunk}")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"request {self.request_id}: unknown dtype {self.dtype!r}")

    @classmethod
    def for_cache(cls, request_id: str, kv_layers: KVLayers, src_block_ids: Sequence[int],
                  dst_block_ids: Sequence[int], layers_per_chunk: int | None = None) -> KVTransferMeta:
        k = kv_layers[0][0]
        per_layer = 2 * len(src_block_ids) * k[0].numel() * k.element_size()
        return cls(
            request_id=request_id,
            src_block_ids=tuple(int(b) for b in src_block_ids),
            dst_block_ids=tuple(int(b) for b in dst_block_ids),
            num_layers=len(kv_layers),
            block_shape=tuple(k.shape[1:]),
            dtype=str(k.dtype).removeprefix("torch."),
            layers_per_chunk=layers_per_chunk or default_layers_per_chunk(per_layer, len(kv_layers)),
        )

    @property
    def nbytes(self) -> int:
        elems = 2 * self.num_layers * len(self.src_block_ids) * _prod(self.block_shape)
        return elems * getattr(torch, self.dtype).itemsize

    def check_cache(self, kv_layers: KVLayers) -> None:
        """Raise ValueError if this worker's cache does not have the shapes the transfer expects."""
        k = kv_layers[0][0] if kv_layers else None
        found = (len(kv_layers), tuple(k.shape[1:]) if k is not None else (), str(k.dtype).removeprefix("torch.")
                 if k is not None else "")
        expected = (self.num_layers, self.block_shape, self.dtype)
        if found != expected:
            raise ValueError(f"request {self.request_id}: cache has (layers, block shape, dtype) {found}, "
                             f"the transfer expects {expected}")


def default_layers_per_chunk(bytes_per_layer: int, num_layers: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(1, min(num_layers, chunk_bytes // max(1, bytes_per_layer)))


class StagingBuffer:
    """A reusable flat buffer for packed KV: a fresh multi-MB allocation per transfer costs page faults.
    Serves one transfer at a time (a worker with concurrent transfers keeps one per transfer)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._flat = torch.empty(0, dtype=torch.uint8, device=self.device)

    def view(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _prod(shape) * dtype.itemsize
        if self._flat.numel() < nbytes:
            self._flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._flat[:nbytes].view(dtype).view(tuple(shape))


def send_kv(transport: Transport, peer_id: str, kv_layers: KVLayers, block_ids: Sequence[int] | torch.Tensor,
            layers_per_chunk: int | None = None, staging: StagingBuffer | None = None) -> TransferHandle:
    """Pack blocks `block_ids` of every layer and send them to `peer_id`, chunk by chunk.
    Returns once everything is packed and posted; the handle completes when the sends do."""
    ids, buffer, chunks = _prepare(kv_layers, block_ids, layers_per_chunk, staging)
    parts: list[tuple[TransferHandle, None]] = []
    for start, stop in chunks:
        part = buffer[start:stop]  # [layers, 2, n_blocks, *block], contiguous
        pack_blocks(kv_layers[start:stop], ids, out=part)
        parts.append((transport.send(peer_id, part), None))  # on the wire while the next chunk packs
    return HandleGroup(parts, keep_alive=buffer)


def recv_kv(transport: Transport, peer_id: str, kv_layers: KVLayers, block_ids: Sequence[int] | torch.Tensor,
            layers_per_chunk: int | None = None, staging: StagingBuffer | None = None) -> TransferHandle:
    """Post receives for blocks `block_ids` of every layer from `peer_id`. The blocks are written
    (unpacked, chunk by chunk as they land) inside the handle's `wait()`."""
    ids, buffer, chunks = _prepare(kv_layers, block_ids, layers_per_chunk, staging)
    parts = []
    for start, stop in chunks:
        part = buffer[start:stop]
        layers = kv_layers[start:stop]
        parts.append((transport.recv(peer_id, part), lambda p=part, ls=layers: unpack_blocks(p, ls, ids)))
    return HandleGroup(parts, keep_alive=buffer)


def _prepare(kv_layers: KVLayers, block_ids: Sequence[int] | torch.Tensor, layers_per_chunk: int | None,
             staging: StagingBuffer | None) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    if not kv_layers:
        raise ValueError("expected at least one (K, V) layer")
    k = kv_layers[0][0]
    ids = torch.as_tensor(block_ids, dtype=torch.int64, device=k.device)
    shape = packed_shape(kv_layers, ids.numel())
    buffer = staging.view(shape, k.dtype) if staging is not None else torch.empty(shape, dtype=k.dtype,
                                                                                    device=k.device)
    step = layers_per_chunk or default_layers_per_chunk(buffer[0].numel() * buffer.element_size(), len(kv_layers))
    return ids, buffer, [(s, min(s + step, len(kv_layers))) for s in range(0, len(kv_layers), step)]


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
