"""The KV data plane's transport: asynchronous point-to-point send and receive of tensors.

`Transport` is the small interface the KV transfer code uses; `TorchDistributedTransport` is
its backend over pairwise torch.distributed groups (gloo on CPU, NCCL on GPU). Another
backend (NIXL/UCX, CUDA IPC) would implement the same two methods.

Ordering: messages between one pair are matched in the order they were posted (as NCCL
does, tags unused), so both sides must post their transfers with a peer in the same order.
Errors: a failed or timed-out operation raises `TransferError` from `wait()` and closes the
pair group (a timed-out gloo pair is unusable anyway); the next transfer with that peer
needs the pair formed again.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch

from services.runtime.errors import TandemError
from services.transfer.pair_group import PairGroups

_TAG = 0  # one message stream per pair: order, not tags, matches sends to receives


class TransferError(TandemError, RuntimeError):
    """A transfer failed or timed out; the data in the receiving tensor is not to be trusted."""


class TransferHandle(ABC):
    """An operation in flight."""

    @abstractmethod
    def wait(self, timeout_s: float | None = None) -> None:
        """Block until it completes; raise `TransferError` if it failed or `timeout_s` passed first
        (None: the transport's own timeout)."""

    @abstractmethod
    def done(self) -> bool:
        """True when `wait()` would return (or raise) without waiting on the wire."""


class Transport(ABC):
    @abstractmethod
    def send(self, peer_id: str, tensor: torch.Tensor) -> TransferHandle:
        """Start sending a contiguous tensor to `peer_id`; keep it unchanged until the handle completes."""

    @abstractmethod
    def recv(self, peer_id: str, tensor: torch.Tensor) -> TransferHandle:
        """Start receiving into a contiguous tensor of the sender's shape and dtype."""


class TorchDistributedTransport(Transport):
    """Point-to-point over the pair groups of one worker (`PairGroups`)."""

    def __init__(self, groups: PairGroups) -> None:
        self.groups = groups

    def send(self, peer_id: str, tensor: torch.Tensor) -> TransferHandle:
        return self._start("send", peer_id, tensor)

    def recv(self, peer_id: str, tensor: torch.Tensor) -> TransferHandle:
        return self._start("recv", peer_id, tensor)

    def _start(self, op: str, peer_id: str, tensor: torch.Tensor) -> TransferHandle:
        if not tensor.is_contiguous():
            raise ValueError(f"{op} needs a contiguous tensor (shape {tuple(tensor.shape)})")
        group, peer_rank = self.groups.group(peer_id)
        what = f"{self.groups.worker_id}: {op} of {tensor.numel() * tensor.element_size()} bytes with {peer_id!r}"
        try:
            work = group.send([tensor], peer_rank, _TAG) if op == "send" else group.recv([tensor], peer_rank, _TAG)
        except Exception as e:  # a closed or broken group
            self.groups.close(peer_id)
            raise TransferError(f"{what} could not start: {e}") from e
        return _WorkHandle(work, what, on_failure=lambda: self.groups.close(peer_id))


class _WorkHandle(TransferHandle):
    def __init__(self, work, what: str, on_failure: Callable[[], object]) -> None:
        self._work = work
        self._what = what
        self._on_failure = on_failure
        self._finished = False

    def wait(self, timeout_s: float | None = None) -> None:
        if self._finished:
            return
        try:
            if timeout_s is None:
                self._work.wait()
            else:
                self._work.wait(timedelta(seconds=max(timeout_s, 0.001)))
        except Exception as e:  # torch reports peer death and timeouts as RuntimeError
            self._on_failure()
            raise TransferError(f"{self._what} failed: {e}") from e
        self._finished = True

    def done(self) -> bool:
        return self._finished or self._work.is_completed()


class HandleGroup(TransferHandle):
    """Several operations as one, each optionally followed by a step run once it completes (in order):
    a chunked receive unpacks chunk i while chunk i + 1 is still on the wire."""

    def __init__(self, parts: Sequence[tuple[TransferHandle, Callable[[], None] | None]], keep_alive=None) -> None:
        self._parts = list(parts)
        self._next = 0  # parts before this one have completed and run their step
        self._keep_alive = keep_alive  # buffers the operations read or write, alive until they finish

    def wait(self, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._next < len(self._parts):
            handle, then = self._parts[self._next]
            handle.wait(None if deadline is None else deadline - time.monotonic())
            if then is not None:
                then()
            self._next += 1
        self._keep_alive = None

    def done(self) -> bool:
        return all(h.done() for h, _ in self._parts[self._next:])
