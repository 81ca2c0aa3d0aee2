"""Two-rank process groups between workers, formed on demand through a store rendezvous.

There is no default (world) process group: each pair of workers that moves KV gets its own
2-rank group, rendezvousing through a TCPStore that one side of the pair hosts. So a worker
that joins or leaves a pool forms or drops only its own pairs, and a dead peer breaks only
the groups it was in.

Forming a pair (the control plane carries only the address):
  1. A: `address = groups.open("B")`        — A hosts a store and will be rank 0;
  2. A: `groups.join("B", address, rank=0)` and B: `groups.join("A", address, rank=1)`,
     at the same time: construction blocks until both sides have arrived.

NCCL groups hold GPU memory per pair, so the control plane, which sees every transfer, closes
a pair on both sides once it has been idle a while (Deployment, `pair_idle_timeout_s`), and
forms it again when the two next exchange KV.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from services.runtime.errors import TandemError

log = logging.getLogger(__name__)

Backend = Literal["gloo", "nccl"]


class PairGroupError(TandemError, RuntimeError):
    """A pair group could not be formed, or is not there."""


@dataclass(frozen=True)
class PairGroupConfig:
    host: str = "127.0.0.1"
    """Address this worker's rendezvous stores listen on and hand to peers (a routable IP across nodes)."""
    timeout_s: float = 60.0
    """How long forming a group waits for the peer, and the default timeout of its operations."""

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


def backend_for(device: str | torch.device) -> Backend:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class _Pair:
    group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None  # None while opened but not yet joined
    store: dist.Store  # kept alive: NCCL reads it again when the communicator starts lazily
    rank: int = 0

    @property
    def peer_rank(self) -> int:
        return 1 - self.rank


class PairGroups:
    """The pair groups one worker is in, keyed by peer id. Owned by that worker (thread-safe)."""

    def __init__(self, worker_id: str, backend: Backend = "gloo", config: PairGroupConfig | None = None) -> None:
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        self.worker_id = worker_id
        self.backend = backend
        self.config = config or PairGroupConfig()
        self._pairs: dict[str, _Pair] = {}
        self._lock = threading.Lock()

    @property
    def _timeout(self) -> timedelta:
        return timedelta(seconds=self.config.timeout_s)

    def open(self, peer_id: str) -> str:
        """Host the rendezvous for a pair with `peer_id` (this side is rank 0); returns "host:port"."""
        with self._lock:
            if peer_id in self._pairs:
                raise PairGroupError(f"{self.worker_id}: a pair with {peer_id!r} is already open; close it first")
            # Port 0: the OS picks a free port, so workers on one host never collide.
            store = dist.TCPStore(self.config.host, 0, None, True, self._timeout, wait_for_workers=False)
            self._pairs[peer_id] = _Pair(group=None, store=store, rank=0)
        return f"{self.config.host}:{store.port}"

    def join(self, peer_id: str, address: str, rank: int) -> None:
        """Form the 2-rank group with `peer_id`. Rank 0 is the side that called `open`; both sides call
        this concurrently, since it blocks until the peer arrives (or raises after `timeout_s`)."""
        if rank not in (0, 1):
            raise ValueError(f"rank must be 0 (the side that opened) or 1, got {rank}")
        host, port = parse_address(address)
        with self._lock:
            pair = self._pairs.get(peer_id)
            if rank == 0 and (pair is None or pair.group is not None):
                raise PairGroupError(f"{self.worker_id}: join({peer_id!r}, rank=0) needs a pending open({peer_id!r})")
            if rank == 1 and pair is not None:
                raise PairGroupError(f"{self.worker_id}: a pair with {peer_id!r} already exists; close it first")
        try:
            store = pair.store if rank == 0 else dist.TCPStore(host, port, None, False, self._timeout)
            # The prefix names the pair, so the store's keys never mix with another group's.
            opener, joiner = (self.worker_id, peer_id) if rank == 0 else (peer_id, self.worker_id)
            prefixed = dist.PrefixStore(f"tandem-pair/{opener}/{joiner}", store)
            group = self._make_group(prefixed, rank)
        except Exception as e:  # torch raises a variety; all mean the same thing here
            with self._lock:
                self._pairs.pop(peer_id, None)
            raise PairGroupError(
                f"{self.worker_id}: could not form a {self.backend} pair group with {peer_id!r} at {address} "
                f"as rank {rank} within {self.config.timeout_s:g}s: {e}"
            ) from e
        with self._lock:
            self._pairs[peer_id] = _Pair(group=group, store=store, rank=rank)
        log.debug("%s: formed %s pair group with %s (rank %d)", self.worker_id, self.backend, peer_id, rank)

    def _make_group(self, store: dist.Store, rank: int) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
        return make_group(self.backend, store, rank, 2, self._timeout)

    def group(self, peer_id: str) -> tuple[dist.ProcessGroupGloo | dist.ProcessGroupNCCL, int]:
        """The group with `peer_id` and the peer's rank in it."""
        with self._lock:
            pair = self._pairs.get(peer_id)
            if pair is None or pair.group is None:
                raise PairGroupError(f"{self.worker_id}: no pair group with {peer_id!r}; form one with open/join")
            return pair.group, pair.peer_rank

    def has(self, peer_id: str) -> bool:
        with self._lock:
            pair = self._pairs.get(peer_id)
            return pair is not None and pair.group is not None

    def peers(self) -> list[str]:
        with self._lock:
            return [p for p, pair in self._pairs.items() if pair.group is not None]

    def close(self, peer_id: str) -> bool:
        """Drop the group with `peer_id` (its pending operations fail). False if there was none."""
        with self._lock:
            pair = self._pairs.pop(peer_id, None)
        if pair is None:
            return False
        if pair.group is not None:
            try:
                # abort, not shutdown: it never waits on a peer that may be dead.
                pair.group.abort()
            except Exception as e:  # closing must not fail the caller
                log.warning("%s: closing the pair group with %s: %s", self.worker_id, peer_id, e)
        return True

    def close_all(self) -> None:
        with self._lock:
            peers = list(self._pairs)
        for peer_id in peers:
            self.close(peer_id)


def make_group(backend: Backend, store: dist.Store, rank: int, world: int,
               timeout: timedelta) -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
    """A process group over `store` without any default group (blocks until all ranks arrive)."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world, options)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected a rendezvous address 'host:port', got {address!r}")
    return host, int(port)
