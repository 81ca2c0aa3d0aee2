"""A deployment: the stage pools of one model, started from a DeploymentConfig, and the loop
that drives them.

Colocated mode has one pool whose workers run every stage (the reference). Disaggregated
mode has a prefill pool and a verify pool: a request is prefilled on the least-loaded
prefill worker, which samples its first token and holds the prompt KV; the deployment then
picks the least-loaded verify worker, which reserves blocks for it, and the prefill worker
pushes the KV into them over their pair group (formed the first time the two meet). Actor
calls carry metadata only. Drafting runs where the tree is verified.

It has the engine's API — `add_request`, `step`, `abort`, `generate`, `stream` — so callers
drive either alike. `step()` advances every busy worker by one forward pass, in parallel, and returns the news.
A worker that dies fails the requests it held with a clear error (finish_reason "error");
the others go on. Pools scale at run time: `scale(stage, n)` starts workers at once, or
marks some draining — they take no new requests and stop once their requests have ended.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from services.cluster.config import DeploymentConfig
from services.cluster.pool import Replica, WorkerPool
from services.cluster.prefix_router import PrefixRouter
from services.runtime.engine import Prompt
from services.runtime.errors import InvalidRequestError, ResourceExhaustedError, TandemError, WorkerLostError
from services.runtime.request import RequestOutput
from services.runtime.sampling_params import MAX_SEED, SamplingParams
from services.runtime.step_loop import StepLoop
from services.workers.load import WorkerLoad
from services.workers.tracing import current_carrier


@dataclass
class _Tracked:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    worker_id: str
    first: RequestOutput | None = None  # the prefill stage's output, until a verify worker has the KV


@dataclass
class TransferStats:
    transfers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0


@dataclass
class Deployment(StepLoop):
    config: DeploymentConfig = field(default_factory=DeploymentConfig)

    def __post_init__(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.config.ray_address, include_dashboard=False, log_to_driver=False)
        self._prefix = uuid.uuid4().hex[:6] + "-"  # worker names unique per deployment
        self.pools = {s: WorkerPool(s, self.config.pool(s), self.config.engine, self._prefix,
                                    self.config.otlp_endpoint) for s in self.config.stages}
        self._requests: dict[str, _Tracked] = {}
        self._pairs: dict[frozenset[str], float] = {}  # formed pair groups -> last used (monotonic)
        self._draft_of: dict[str, str] = {}  # verify worker -> the draft worker it asks for trees
        self.router = PrefixRouter(self.config.engine.block_size)
        self.transfer = TransferStats()
        try:  # every pool's workers load their models at once: a deployment starts as fast as its slowest
            launched = [(stage, self._launch(stage, self.config.pool(stage).replicas)) for stage in self.pools]
            for stage, workers in launched:
                self.pools[stage].await_ready(workers)
        except BaseException:
            self.shutdown()
            raise

    # --- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: Prompt, params: SamplingParams = SamplingParams(),
                    request_id: str | None = None) -> str:
        """Send a request to the entry stage's least-loaded worker; returns its id.
        Bad input raises InvalidRequestError naming the field, before any worker holds it."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        params.validate()
        entry = self.pools[self.config.stages[0]].live
        if not entry:
            raise ResourceExhaustedError(f"no live {self.config.stages[0]} worker")
        prompt_ids = _unwrap(lambda: ray.get(entry[0].handle.tokenize.remote(prompt)))  # any worker: same ids
        replica = self._entry_worker(entry, prompt_ids)
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED)
        trace = current_carrier()  # the request's span, where the caller traces it
        _unwrap(lambda: ray.get(replica.handle.add.remote(request_id, prompt_ids, params, seed, trace=trace)))
        self._requests[request_id] = _Tracked(request_id, prompt_ids, params, seed, replica.worker_id)
        return request_id

    def abort(self, request_id: str) -> bool:
        tracked = self._requests.pop(request_id, None)
        if tracked is None:
            return False
        replica = self._replica(tracked.worker_id)
        if replica is not None:
            call = replica.handle.drop_handoff if tracked.first is not None else replica.handle.abort
            try:
                ray.get(call.remote(request_id))
            except RayActorError:
                pass  # it died with the worker
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def worker_of(self, request_id: str) -> str | None:
        """The worker holding the request now (None once it has ended)."""
        tracked = self._requests.get(request_id)
        return tracked.worker_id if tracked else None

    def step(self) -> list[RequestOutput]:
        """One forward pass on every worker that holds requests; hand-offs; the news."""
        # A request waiting for a verify worker has nothing to compute where it is.
        busy = {t.worker_id for t in self._requests.values() if t.first is None}
        trace = current_carrier()  # the caller's span of this step, if it traces
        calls = {}
        for worker_id in busy:
            replica = self._replica(worker_id)
            if replica is not None:
                calls[worker_id] = replica.handle.step.remote(trace=trace)
        news: list[RequestOutput] = []
        for worker_id, ref in calls.items():
            try:
                outputs = ray.get(ref)
            except RayActorError as e:
                news += self._lose_worker(worker_id, e)
                continue
            for out in outputs:
                news += self._route(out)
        # Prefilled this step, or still waiting for room on a verify worker (the prefill worker
        # holds their KV under a lease meanwhile).
        for tracked in [t for t in self._requests.values() if t.first is not None]:
            news += self._hand_off(tracked)
        self._retire_drained()
        self._reap_idle_pairs()
        return news

    def _route(self, out: RequestOutput) -> list[RequestOutput]:
        tracked = self._requests.get(out.request_id)
        if tracked is None:
            return []  # aborted meanwhile
        if out.finish_reason == "handoff":  # the first token: the rest comes from a verify worker
            tracked.first = replace(out, finished=False, finish_reason=None)
            return [tracked.first]
        if out.finished:
            del self._requests[out.request_id]
        return [out]

    def _hand_off(self, tracked: _Tracked) -> list[RequestOutput]:
        """Move a prefilled request to a verify worker: reserve there, then push the KV."""
        rid = tracked.request_id
        source = self._replica(tracked.worker_id)
        if source is None:
            return []
        for target in self._by_load(self.pools["verify"].live):
            try:
                ray.get(target.handle.reserve.remote(rid, tracked.prompt_ids, tracked.first.token_ids[0],
                                                     tracked.params, tracked.seed, trace=current_carrier()))
            except RayTaskError as e:
                if isinstance(e.cause, ResourceExhaustedError):
                    continue
                raise e.cause from None
            except RayActorError:
                continue  # the step loop will notice it is gone
            break
        else:  # no room anywhere yet: the prefill worker keeps the KV (leased); retried next step
            return []
        try:
            self._ensure_pair(source, target)
            timeout = self.config.handoff_timeout_s
            started = time.perf_counter()
            trace = current_carrier()
            sent, _ = ray.get([source.handle.send_kv.remote(rid, target.worker_id, timeout, trace=trace),
                               target.handle.receive_kv.remote(rid, source.worker_id, timeout, trace=trace)])
        except (RayActorError, RayTaskError) as e:
            self.transfer.failures += 1
            self._drop_pair(source, target)  # a failed pair is unusable: form it afresh next time
            for side, call in ((target, "abort"), (source, "drop_handoff")):
                try:
                    ray.get(getattr(side.handle, call).remote(rid))
                except RayActorError:
                    pass  # that side is gone; the step loop will notice
            return [self._fail(tracked, f"KV transfer {source.worker_id} -> {target.worker_id} failed: "
                                        f"{_cause(e)}", retryable=True)]
        self.transfer.transfers += 1
        self.transfer.bytes += sent
        self.transfer.seconds += time.perf_counter() - started
        tracked.worker_id = target.worker_id
        tracked.first = None
        return []

    def _ensure_pair(self, a: Replica, b: Replica) -> None:
        key = frozenset((a.worker_id, b.worker_id))
        if key not in self._pairs:
            address = ray.get(a.handle.open_pair.remote(b.worker_id))
            ray.get([a.handle.join_pair.remote(b.worker_id, address, 0),
                     b.handle.join_pair.remote(a.worker_id, address, 1)])
        self._pairs[key] = time.monotonic()

    def _drop_pair(self, a: Replica, b: Replica) -> None:
        self._pairs.pop(frozenset((a.worker_id, b.worker_id)), None)
        for side, peer in ((a, b), (b, a)):
            side.handle.close_pair.remote(peer.worker_id)

    def _reap_idle_pairs(self) -> None:
        """Close, on both sides at once, pair groups no transfer used for `pair_idle_timeout_s`
        (an NCCL group holds GPU memory per pair); the next transfer between the two forms it again."""
        now = time.monotonic()
        for key in [k for k, used in self._pairs.items() if now - used > self.config.pair_idle_timeout_s]:
            a, b = (self._replica(w) for w in key)
            if a is not None and b is not None:
                self._drop_pair(a, b)
            else:
                self._pairs.pop(key)

    def _forget_pairs(self, worker_id: str) -> None:
        """The worker is going: its peers close their groups with it (without waiting)."""
        for key in [k for k in self._pairs if worker_id in k]:
            self._pairs.pop(key)
            (peer,) = key - {worker_id}
            replica = self._replica(peer)
            if replica is not None:
                replica.handle.close_pair.remote(worker_id)

    def _lose_worker(self, worker_id: str, error: BaseException) -> list[RequestOutput]:
        """A worker died: fail its requests with a clear error, forget it, tell its peers."""
        for pool in self.pools.values():
            pool.remove(worker_id)
        self._draft_of.pop(worker_id, None)
        self.router.forget(worker_id)
        self._forget_pairs(worker_id)
        lost = [t for t in self._requests.values() if t.worker_id == worker_id]
        reason = f"worker {worker_id} died: {type(error).__name__}"
        return [self._fail(t, str(WorkerLostError(reason)), retryable=True) for t in lost]

    def _fail(self, tracked: _Tracked, message: str, retryable: bool = False) -> RequestOutput:
        self._requests.pop(tracked.request_id, None)
        done = tracked.first.token_ids if tracked.first else []
        return RequestOutput(tracked.request_id, [], "", done, tracked.first.text if tracked.first else "",
                             finished=True, finish_reason="error", prompt_tokens=len(tracked.prompt_ids),
                             cached_prompt_tokens=0, error=message, retryable=retryable)

    # --- pools ------------------------------------------------------------------------------------
    def _launch(self, stage: str, count: int) -> list[Replica]:
        """Start `count` workers of a stage without waiting for them to load."""
        if stage != "verify" or "draft" not in self.pools:
            return self.pools[stage].launch(count)
        # Each new verify worker is attached to a draft worker, the least-used first.
        chosen: list[str] = []

        def draft_worker() -> tuple:
            live = self.pools["draft"].live
            uses = {r.worker_id: list(self._draft_of.values()).count(r.worker_id) + chosen.count(r.worker_id)
                    for r in live}
            pick = min(live, key=lambda r: uses[r.worker_id])
            chosen.append(pick.worker_id)
            return (pick.handle,)

        launched = self.pools["verify"].launch(count, draft_worker)
        self._draft_of.update(zip((r.worker_id for r in launched), chosen))
        return launched

    def scale(self, stage: str, replicas: int) -> None:
        """Grow a pool now, or shrink it by draining its least-loaded workers."""
        pool = self._pool(stage)
        if replicas < 1:
            raise ValueError(f"a {stage} pool needs at least one worker, got {replicas}")
        live = pool.live
        if replicas > len(live):
            pool.await_ready(self._launch(stage, replicas - len(live)))
        if stage == "draft":  # the draft workers serving the fewest verify workers drain first
            order = sorted(live, key=lambda r: list(self._draft_of.values()).count(r.worker_id))
        else:
            order = self._by_load(live)
        for replica in order[:max(0, len(live) - replicas)]:
            replica.draining = True
        self._retire_drained()

    def _retire_drained(self) -> None:
        # A draft worker is held by the verify workers attached to it; a verify worker by its requests.
        holding = {t.worker_id for t in self._requests.values()} | set(self._draft_of.values())
        for pool in self.pools.values():
            for replica in [r for r in pool.replicas.values() if r.draining and r.worker_id not in holding]:
                self._forget_pairs(replica.worker_id)
                pool.remove(replica.worker_id)
                self._draft_of.pop(replica.worker_id, None)
                self.router.forget(replica.worker_id)

    def workers(self, stage: str | None = None) -> list[str]:
        pools = [self._pool(stage)] if stage else self.pools.values()
        return [w for p in pools for w in p.replicas]

    def load(self) -> list[WorkerLoad]:
        replicas = [r for p in self.pools.values() for r in p.replicas.values()]
        return ray.get([r.handle.load.remote() for r in replicas])

    def call(self, worker_id: str, method: str, *args):
        """Call a worker's method and wait (operators and tests: leak checks, statistics)."""
        replica = self._replica(worker_id)
        if replica is None:
            raise KeyError(f"no worker {worker_id!r}")
        return ray.get(getattr(replica.handle, method).remote(*args))

    def shutdown(self) -> None:
        if self.config.otlp_endpoint:  # export the workers' last spans before stopping them
            refs = [r.handle.flush_traces.remote() for pool in self.pools.values() for r in pool.replicas.values()]
            try:
                ray.get(refs, timeout=10)
            except (RayActorError, RayTaskError, ray.exceptions.GetTimeoutError):
                pass  # a dead worker's spans are gone with it
        for pool in self.pools.values():
            for worker_id in list(pool.replicas):
                pool.remove(worker_id)
        self._requests.clear()

    def _pool(self, stage: str) -> WorkerPool:
        if stage not in self.pools:
            raise ValueError(f"no {stage!r} pool in {self.config.mode} mode; pools: {sorted(self.pools)}")
        return self.pools[stage]

    def _entry_worker(self, replicas: list[Replica], prompt_ids: list[int]) -> Replica:
        """Where a prompt starts: the worker likely to hold its prefix's KV, else the least loaded."""
        if len(replicas) == 1:
            chosen = replicas[0]
        else:
            loads = ray.get([r.handle.load.remote() for r in replicas])
            worker = self.router.choose(prompt_ids, loads).worker_id
            chosen = next(r for r in replicas if r.worker_id == worker)
        self.router.record(chosen.worker_id, prompt_ids)
        return chosen

    def _by_load(self, replicas: list[Replica]) -> list[Replica]:
        """Least loaded first; the loads are asked for all at once."""
        if len(replicas) < 2:
            return list(replicas)
        loads = ray.get([r.handle.load.remote() for r in replicas])
        return [r for r, _ in sorted(zip(replicas, loads), key=lambda rl: rl[1].sort_key())]

    def _replica(self, worker_id: str) -> Replica | None:
        for pool in self.pools.values():
            if worker_id in pool.replicas:
                return pool.replicas[worker_id]
        return None

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _unwrap(call):
    """Re-raise a worker's own error (bad input, no room) as itself, not wrapped by Ray."""
    try:
        return call()
    except RayTaskError as e:
        if isinstance(e.cause, TandemError):
            raise e.cause from None
        raise


def _cause(e: BaseException) -> str:
    return str(e.cause) if isinstance(e, RayTaskError) and e.cause is not None else str(e)
