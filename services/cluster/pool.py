"""One stage's pool of Ray actor workers: start, list, pick by load, drain and remove.

Each worker gets its own placement group when it asks for resources, so a worker's GPUs
(several, for a multi-rank draft worker) sit together on one node. Pools are independent:
adding or removing a replica of one never touches another pool's workers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.cluster.config import PoolConfig
from services.runtime.engine import EngineConfig
from services.workers.draft_worker import DraftWorker
from services.workers.engine_worker import EngineWorker
from services.workers.prefill_worker import PrefillWorker
from services.workers.tracing import export_env
from services.workers.verify_worker import VerifyWorker

WORKER_CLASSES: dict[str, type[EngineWorker]] = {
    "colocated": EngineWorker,
    "prefill": PrefillWorker,
    "verify": VerifyWorker,
    "draft": DraftWorker,
}


@dataclass
class Replica:
    worker_id: str
    handle: ray.actor.ActorHandle  # rank 0: the one every call goes to
    placement: object | None = None
    draining: bool = False
    followers: list[ray.actor.ActorHandle] = field(default_factory=list)  # ranks 1.. of a multi-rank worker


class WorkerPool:
    _ids = itertools.count()

    def __init__(self, stage: str, config: PoolConfig, engine: EngineConfig, name_prefix: str = "",
                 otlp_endpoint: str | None = None) -> None:
        self.stage = stage
        self.env = export_env(otlp_endpoint, f"tandem-{stage}")  # the workers' span export
        self.config = config
        self.engine = engine
        self.name_prefix = name_prefix
        self.replicas: dict[str, Replica] = {}
        self._actor_class = ray.remote(WORKER_CLASSES[stage])

    def launch(self, count: int, extra_args: Callable[[], tuple] = tuple) -> list[Replica]:
        """Start `count` more workers without waiting for them (see `await_ready`), so that the
        pools of a new deployment load their models side by side. `extra_args()` gives each new
        worker's constructor arguments after the common ones. They are listed at once:
        removing the pool's workers also stops those still loading."""
        new = [self._launch(extra_args()) for _ in range(count)]
        self.replicas.update((r.worker_id, r) for r in new)
        return new

    def await_ready(self, launched: list[Replica]) -> None:
        """Wait until launched workers have loaded their models; if one fails, remove them all."""
        try:
            ray.get([r.handle.ready.remote() for r in launched])
        except BaseException:
            for r in launched:
                self.remove(r.worker_id)
            raise

    def _launch(self, extra_args: tuple) -> Replica:
        worker_id = f"{self.name_prefix}{self.stage}-{next(self._ids)}"
        cfg = self.config
        placement = None
        if cfg.num_cpus > 0 or cfg.num_gpus > 0:
            bundle = {k: v for k, v in (("CPU", cfg.num_cpus), ("GPU", cfg.num_gpus)) if v > 0}
            placement = placement_group([bundle] * cfg.ranks, strategy="STRICT_PACK")  # one bundle per rank
            ray.get(placement.ready())

        def options(rank: int) -> dict:
            opts: dict = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                          "name": worker_id if rank == 0 else f"{worker_id}/rank{rank}"}
            if self.env:
                opts["runtime_env"] = {"env_vars": self.env}
            if placement is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement, rank)
            return opts

        followers = [self._actor_class.options(**options(rank)).remote(
            f"{worker_id}/rank{rank}", self.engine, cfg.torch_threads, follower=True) for rank in range(1, cfg.ranks)]
        handle = self._actor_class.options(**options(0)).remote(
            worker_id, self.engine, cfg.torch_threads, *extra_args, **({"followers": followers} if followers else {}))
        return Replica(worker_id, handle, placement, followers=followers)

    @property
    def live(self) -> list[Replica]:
        """Workers that take new requests."""
        return [r for r in self.replicas.values() if not r.draining]

    def remove(self, worker_id: str) -> None:
        """Stop a worker now (drained, or dead) and give its resources back."""
        r = self.replicas.pop(worker_id, None)
        if r is None:
            return
        for handle in (r.handle, *r.followers):
            ray.kill(handle, no_restart=True)
        if r.placement is not None:
            remove_placement_group(r.placement)
