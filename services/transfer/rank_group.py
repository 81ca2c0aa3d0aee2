"""The ranks of one worker that spans several processes (an EasySpec draft worker over
several devices): one process group over all of them, formed like a pair group through a
TCPStore that rank 0 hosts, so it touches no other worker's groups.

  1. rank 0: `store, address = host_store(config)`;
  2. every rank at once: `RankGroup.join(name, address, rank, world, ...)` (rank 0 passes its
     store) — it blocks until all ranks have arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from services.transfer.pair_group import Backend, PairGroupConfig, PairGroupError, make_group, parse_address


def host_store(config: PairGroupConfig = PairGroupConfig()) -> tuple[dist.TCPStore, str]:
    """Rank 0's rendezvous store (an OS-chosen port) and the "host:port" the others dial."""
    store = dist.TCPStore(config.host, 0, None, True, timedelta(seconds=config.timeout_s), wait_for_workers=False)
    return store, f"{config.host}:{store.port}"


@dataclass
class RankGroup:
    rank: int
    world: int
    group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL
    store: dist.Store  # kept alive: NCCL reads it again when its communicator starts lazily

    @classmethod
    def join(cls, name: str, address: str, rank: int, world: int, backend: Backend = "gloo",
             timeout_s: float = PairGroupConfig.timeout_s, store: dist.Store | None = None) -> RankGroup:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        timeout = timedelta(seconds=timeout_s)
        try:
            if store is None:
                host, port = parse_address(address)
                store = dist.TCPStore(host, port, None, False, timeout)
            group = make_group(backend, dist.PrefixStore(f"tandem-ranks/{name}", store), rank, world, timeout)
        except Exception as e:  # torch raises a variety; all mean the same thing here
            raise PairGroupError(f"{name}: rank {rank} of {world} could not form its {backend} group at "
                                 f"{address} within {timeout_s:g}s: {e}") from e
        return cls(rank, world, group, store)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place; every rank gets the same bits."""
        self.group.allreduce([tensor]).wait()
