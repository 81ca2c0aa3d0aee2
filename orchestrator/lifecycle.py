"""A request's life on this orchestrator replica: admitted, recorded, run, streamed, ended, and
taken up again when something under it fails.

Order that keeps the "nothing lost" invariant: every token is appended to the state store
before any client stream sees it (the pump below), and the final status is written before
the stream's last message. Each running request holds this replica's lease in the store,
renewed by a heartbeat.

Failover. Sampling randomness is keyed by (seed, position), so running prompt + tokens so far
as a new prompt continues a request exactly. That one move serves three failures:
- its worker died: the pump re-dispatches it to a live worker (`max_redispatches` times);
- its replica died: another replica's `adopt` takes the expired lease and runs it from the
  tokens in the store;
- the store lost it (Redis restarted with nothing on disk): the record and tokens are written
  again from what this replica holds, and the request goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from orchestrator.admission import Admission
from orchestrator.engine_driver import EngineDriver
from orchestrator.metrics import RequestObserver, ServerMetrics
from orchestrator.session import RequestSession
from orchestrator.state import (
    RequestExists,
    RequestRecord,
    RequestStatus,
    StateStore,
    StateStoreUnavailable,
    TokenConflict,
    UnknownRequest,
)
from orchestrator.tracing import request_attributes
from orchestrator.validation import ValidRequest
from services.runtime.request import RequestOutput
from services.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)
LEASE = "orchestrator"

# Engine finish reasons -> the API's, and the stored status they end in.
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled", "error": "error"}
FINAL_STATUS = {"stop": RequestStatus.FINISHED, "length": RequestStatus.FINISHED,
                "cancelled": RequestStatus.CANCELLED, "error": RequestStatus.FAILED}


@dataclass(frozen=True)
class LifecycleConfig:
    replica_id: str = dataclasses.field(default_factory=lambda: f"orchestrator-{uuid.uuid4().hex[:8]}")
    lease_ttl_s: float = 10.0
    """A replica that stops renewing for this long loses its requests to whichever replica resumes them."""
    heartbeat_s: float = 2.0
    detach_grace_s: float = 5.0
    """A request nobody is streaming any more is cancelled after this long, unless a Resume comes."""
    max_redispatches: int = 3
    """Times a request whose worker died is run again elsewhere before it fails."""
    store_retry_s: float = 60.0
    """How long a finished request's final state is retried while the state store does not answer."""
    store_retry_interval_s: float = 0.5


@dataclass
class FailoverStats:
    """How often each kind of failover happened on this replica (metrics; tests check the path ran)."""

    redispatches: int = 0  # requests run again after their worker died
    adoptions: int = 0  # requests taken over from a replica that is gone
    store_rewrites: int = 0  # requests written to the state store again after it lost them


@dataclass
class _Run:
    """What this replica holds of a request it runs: enough to run it again or write it again."""

    record: RequestRecord
    params: SamplingParams
    session: RequestSession
    outputs: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    pump: asyncio.Task | None = None
    redispatches: int = 0
    store_behind: bool = False  # the store missed some of it (down, or restarted empty)
    observer: RequestObserver | None = None
    claim: int = 0  # KV tokens it holds of the admission budget
    span: trace.Span = trace.INVALID_SPAN  # the request's trace root
    phase: trace.Span = trace.INVALID_SPAN  # prefill, then decode
    decoding: bool = False  # a token came since it was (last) dispatched

    @property
    def tokens_needed(self) -> int:
        return len(self.record.prompt_token_ids) + self.params.max_tokens


class RequestManager:
    def __init__(self, driver: EngineDriver, store: StateStore, config: LifecycleConfig = LifecycleConfig(),
                 decode: Callable[[Sequence[int]], str] = lambda ids: "", metrics: ServerMetrics | None = None,
                 admission: Admission | None = None, tracer: trace.Tracer | None = None) -> None:
        self.driver = driver
        self.tracer = tracer or trace.NoOpTracer()
        self.store = store
        self.config = config
        self.admission = admission or Admission()
        self.metrics = metrics
        self.decode = decode  # text of tokens this replica did not generate itself (an adopted request's)
        self.runs: dict[str, _Run] = {}
        self._heartbeat: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # final states waiting for the store to come back
        self.failovers = FailoverStats()
        self.waiting = 0  # requests queued for admission

    @property
    def replica_id(self) -> str:
        return self.config.replica_id

    def session(self, request_id: str) -> RequestSession | None:
        run = self.runs.get(request_id)
        return run.session if run is not None else None

    async def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._beat(), name="lease-heartbeat")

    async def stop(self) -> None:
        """Cancel what still runs here and stop the heartbeat."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for rid in list(self.runs):
            await self.cancel(rid)
        for task in self._background:
            task.cancel()

    # --- admission -------------------------------------------------------------------------------
    def trace_context(self, request_id: str):
        """A context whose parent is the request's trace (for spans of its streams); None if not here."""
        run = self.runs.get(request_id)
        return trace.set_span_in_context(run.span) if run is not None else None

    async def submit(self, req: ValidRequest, parent=None) -> tuple[RequestRecord, bool]:
        """Record a request, wait for admission, start it. Returns its record and whether it is new: a
        retry with a known idempotency key returns the first request's record and starts nothing.
        Raises ResourceExhaustedError when it cannot be admitted, InvalidRequestError on bad input;
        cancelling the caller while it queues (deadline, client gone) cancels the request."""
        record = RequestRecord(request_id=uuid.uuid4().hex, model=req.model, prompt_token_ids=list(req.prompt_ids),
                               seed=req.params.seed, params=_params_dict(req.params, req.drafter),
                               idempotency_key=req.idempotency_key, priority=req.priority)
        run = _Run(record, req.params, RequestSession(record.request_id, len(record.prompt_token_ids)))
        self.admission.check(run.tokens_needed)  # refuse before recording what cannot be admitted
        record, created = await self.store.create(record)
        if not created:
            return record, False
        if not await self.store.acquire_lease(record.request_id, LEASE, self.replica_id, self.config.lease_ttl_s):
            return record, False  # a replica resuming it got there first (it found no lease yet): it runs it
        run.span = self.tracer.start_span("tandem.generate", context=parent, kind=trace.SpanKind.SERVER,
                                          attributes=request_attributes(req.model, req.prompt_kind, req.params,
                                                                        record.request_id))
        await self._admit_and_run(run)
        return record, True

    async def adopt(self, record: RequestRecord) -> RequestSession | None:
        """Take over a request whose replica is gone (its lease expired) and run it here from the
        tokens in the store. None if it runs elsewhere (the lease is held) or has ended."""
        rid = record.request_id
        if rid in self.runs:
            return self.runs[rid].session
        if record.status.terminal:
            return None
        run = _Run(record, _params_of(record), RequestSession(rid, len(record.prompt_token_ids)))
        self.admission.check(run.tokens_needed)
        if not await self.store.acquire_lease(rid, LEASE, self.replica_id, self.config.lease_ttl_s):
            return None
        tokens = await self.store.tokens(rid)
        log.warning("request %s: its replica is gone; taking it over after %d tokens", rid, len(tokens))
        self._count_failover("adoptions")
        run.span = self.tracer.start_span("tandem.generate", kind=trace.SpanKind.SERVER, attributes={
            **request_attributes(record.model, "", run.params, rid), "tandem.adopted_after_tokens": len(tokens)})
        await run.session.push(tokens, self.decode(tokens))
        await self._admit_and_run(run)
        return run.session

    async def _admit_and_run(self, run: _Run) -> None:
        if self.metrics is not None:  # latencies count from arrival, the queue included
            run.observer = self.metrics.observer(len(run.record.prompt_token_ids))
        self.waiting += 1
        self._gauge()
        admission = self.tracer.start_span("tandem.admission", context=trace.set_span_in_context(run.span))
        try:
            await self.admission.admit(run.tokens_needed, run.record.priority)
        except BaseException as e:
            admission.record_exception(e)
            await self._never_started(run, e)
            raise
        finally:
            admission.end()
            self.waiting -= 1
            self._gauge()
        run.claim = run.tokens_needed
        await self._run(run)

    async def _run(self, run: _Run) -> None:
        rid = run.record.request_id
        self.runs[rid] = run
        self._gauge()
        run.phase = self.tracer.start_span("tandem.prefill", context=trace.set_span_in_context(run.span))
        try:
            await self._dispatch(run)
        except BaseException as e:
            run.phase.end()
            self.runs.pop(rid, None)
            self._release(run)
            await self._never_started(run, e)
            raise
        if run.record.status == RequestStatus.QUEUED:
            run.record = await self.store.set_status(rid, RequestStatus.RUNNING)
        run.pump = asyncio.create_task(self._pump(run), name=f"pump-{rid}")

    async def _never_started(self, run: _Run, e: BaseException) -> None:
        """A request that failed (or was cancelled) before the engine took it: end its trace and record why."""
        cancelled = isinstance(e, (asyncio.CancelledError, TimeoutError))
        run.span.record_exception(e)
        run.span.set_status(trace.StatusCode.ERROR, type(e).__name__)
        run.span.end()
        rid = run.record.request_id
        await self._quietly(self.store.set_status(
            rid, RequestStatus.CANCELLED if cancelled else RequestStatus.FAILED,
            finish_reason="cancelled" if cancelled else "error", error=None if cancelled else str(e)))
        await self._quietly(self.store.release_lease(rid, LEASE, self.replica_id))

    def _release(self, run: _Run) -> None:
        if run.claim:
            self.admission.release(run.claim)
            run.claim = 0
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.running.labels(self.metrics.model).set(len(self.runs))
            self.metrics.waiting.labels(self.metrics.model).set(self.waiting)

    async def _dispatch(self, run: _Run) -> None:
        """Hand the request to the engine: its prompt plus every token generated so far."""
        done = run.session.token_ids
        params = dataclasses.replace(run.params, max_tokens=run.params.max_tokens - len(done))
        await self.driver.add(run.record.request_id, run.record.prompt_token_ids + done, params,
                              run.outputs.put_nowait, run.span.get_span_context())

    # --- ending it ---------------------------------------------------------------------------------
    async def cancel(self, request_id: str, reason: str = "cancelled", error: str | None = None) -> bool:
        """Stop a request running here and free its KV; False if it is not running here."""
        run = self.runs.get(request_id)
        if run is None or run.session.ending is not None:
            return False
        await self.driver.abort(request_id)
        await self._finish(run, reason, error)
        return True

    async def cancel_anywhere(self, request_id: str) -> RequestStatus | None:
        """Cancel here, or mark it cancelled in the store for the replica that runs it (its heartbeat
        sees the mark and stops it). Returns the status after the call; None if unknown."""
        if await self.cancel(request_id):
            return RequestStatus.CANCELLED
        record = await self.store.get(request_id)
        if record is None:
            return None
        if not record.status.terminal:
            try:
                record = await self.store.set_status(request_id, RequestStatus.CANCELLED, finish_reason="cancelled")
            except ValueError:  # it ended meanwhile
                record = await self.store.get(request_id) or record
        return record.status

    def detached(self, request_id: str) -> None:
        """A client stream of this request went away: cancel it if nobody follows it after the grace time."""
        session = self.session(request_id)
        if session is not None and session.ending is None and session.followers == 0:
            asyncio.get_running_loop().call_later(self.config.detach_grace_s, self._cancel_if_orphaned, request_id)

    def _cancel_if_orphaned(self, request_id: str) -> None:
        session = self.session(request_id)
        if session is not None and session.ending is None and session.followers == 0:
            log.info("request %s: no client follows it; cancelling", request_id)
            asyncio.ensure_future(self.cancel(request_id))

    async def _finish(self, run: _Run, finish_reason: str, error: str | None, write_store: bool = True) -> None:
        rid, session = run.record.request_id, run.session
        if session.ending is not None:
            return
        if write_store and not await self._write_final(run, finish_reason, error):
            task = asyncio.create_task(self._write_final_later(run, finish_reason, error))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        await session.end(finish_reason, error)
        self._end_trace(run, finish_reason, error)
        self.runs.pop(rid, None)
        self._release(run)
        if run.observer is not None:
            run.observer.finished(finish_reason)
        if run.pump is not None and run.pump is not asyncio.current_task():
            run.pump.cancel()

    @staticmethod
    def _end_trace(run: _Run, finish_reason: str, error: str | None) -> None:
        run.phase.end()
        run.span.set_attributes({"gen_ai.usage.input_tokens": run.session.prompt_tokens,
                                 "gen_ai.usage.output_tokens": run.session.num_tokens,
                                 "gen_ai.response.finish_reasons": [finish_reason],
                                 "tandem.redispatches": run.redispatches})
        if error:
            run.span.set_status(trace.StatusCode.ERROR, error)
        run.span.end()

    async def _write_final(self, run: _Run, finish_reason: str, error: str | None) -> bool:
        """The final status (and whatever tokens the store missed). False if the store does not answer."""
        rid, session = run.record.request_id, run.session
        usage = {"prompt_tokens": session.prompt_tokens, "completion_tokens": session.num_tokens,
                 "cached_prompt_tokens": session.cached_prompt_tokens}

        def final():
            return self.store.set_status(rid, FINAL_STATUS[finish_reason], finish_reason=finish_reason, error=error,
                                         usage=usage)

        try:
            if run.store_behind:
                await self._resync(run)
            try:
                await final()
            except UnknownRequest:  # the store lost it (restarted empty) after the last append
                await self._resync(run)
                await final()
            await self.store.release_lease(rid, LEASE, self.replica_id)
        except StateStoreUnavailable:
            return False
        except ValueError as e:  # already ended (cancelled through another replica)
            log.info("request %s: final state not written: %s", rid, e)
        return True

    async def _write_final_later(self, run: _Run, finish_reason: str, error: str | None) -> None:
        deadline = asyncio.get_running_loop().time() + self.config.store_retry_s
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(self.config.store_retry_interval_s)
            if await self._write_final(run, finish_reason, error):
                return
        log.error("request %s: the state store stayed unavailable; its final state was not written",
                  run.record.request_id)

    async def _let_go(self, run: _Run, why: str) -> None:
        """Another replica owns the request now: stop it here without touching its stored state."""
        log.warning("request %s: %s; stopping it here", run.record.request_id, why)
        await self.driver.abort(run.record.request_id)
        await self._finish(run, "error", f"request moved to another orchestrator replica ({why}); Resume there",
                           write_store=False)

    # --- a request's outputs, in order -----------------------------------------------------------
    async def _pump(self, run: _Run) -> None:
        session = run.session
        while True:
            out = await run.outputs.get()
            if session.ending is not None:
                return  # cancelled here already
            if out.finished and out.finish_reason == "error" and out.retryable:
                if await self._redispatch(run, out.error):
                    continue
            session.cached_prompt_tokens = max(session.cached_prompt_tokens, out.cached_prompt_tokens)
            if out.new_token_ids and not await self._persist(run, list(out.new_token_ids)):
                return
            if out.new_token_ids and not run.decoding:  # the first token: prefill is over
                run.decoding = True
                run.phase.end()
                run.phase = self.tracer.start_span("tandem.decode", context=trace.set_span_in_context(run.span))
            await session.push(list(out.new_token_ids), out.new_text)
            if run.observer is not None:
                run.observer.tokens_streamed(len(out.new_token_ids))
            if out.finished:
                await self._finish(run, FINISH_REASONS.get(out.finish_reason or "", "stop"), out.error)
                return

    async def _redispatch(self, run: _Run, error: str | None) -> bool:
        if run.redispatches >= self.config.max_redispatches:
            return False
        run.redispatches += 1
        self._count_failover("redispatches")
        log.warning("request %s: %s; running it again elsewhere from token %d (attempt %d)",
                    run.record.request_id, error, run.session.num_tokens, run.redispatches)
        try:
            await self._dispatch(run)
        except Exception as e:  # no live worker, or none with room
            log.warning("request %s: could not run it again: %s", run.record.request_id, e)
            return False
        return True

    async def _persist(self, run: _Run, token_ids: list[int]) -> bool:
        """Append to the store before any stream sees the tokens. False: the request is no longer ours."""
        rid, start = run.record.request_id, run.session.num_tokens
        for _ in range(2):  # a second time after writing back what the store lost
            try:
                if run.store_behind:
                    await self._resync(run)
                await self.store.append_tokens(rid, start, token_ids)
                return True
            except TokenConflict as e:
                await self._let_go(run, f"another replica wrote its tokens ({e})")
                return False
            except UnknownRequest:
                run.store_behind = True  # the store lost it: write it again, then append (second attempt)
            except StateStoreUnavailable as e:
                # The request goes on; its record is written again from what this replica holds once the
                # store answers (the next append, or the end).
                run.store_behind = True
                log.warning("request %s: state store unavailable (%s); tokens kept here until it is back", rid, e)
                return True
        return True

    async def _resync(self, run: _Run) -> None:
        """Write the request's record and tokens again where the store lost or missed them."""
        rid, tokens = run.record.request_id, run.session.token_ids
        if await self.store.get(rid) is None:
            try:
                await self.store.create(dataclasses.replace(run.record, status=RequestStatus.RUNNING))
            except RequestExists:
                pass
            await self.store.acquire_lease(rid, LEASE, self.replica_id, self.config.lease_ttl_s)
        stored = await self.store.num_tokens(rid)
        if stored < len(tokens):
            await self.store.append_tokens(rid, stored, tokens[stored:])
        run.store_behind = False
        self._count_failover("store_rewrites")
        log.info("request %s: written to the state store again (%d tokens)", rid, len(tokens))

    # --- leases ----------------------------------------------------------------------------------
    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            for rid, run in list(self.runs.items()):
                try:
                    if run.store_behind:
                        await self._resync(run)
                    held = await self.store.renew_lease(rid, LEASE, self.replica_id, self.config.lease_ttl_s)
                    record = await self.store.get(rid)
                except StateStoreUnavailable:
                    break  # try again next beat; the requests go on meanwhile
                except Exception:  # never let one request stop the heartbeat of the others
                    log.exception("request %s: heartbeat failed", rid)
                    continue
                if record is not None and record.status == RequestStatus.CANCELLED:
                    await self.cancel(rid)  # cancelled through another replica
                elif record is not None and not held and rid in self.runs:
                    await self._let_go(run, "its lease expired and another replica took it")

    def _count_failover(self, kind: str) -> None:
        """`kind`: a FailoverStats field; also the metric's label."""
        setattr(self.failovers, kind, getattr(self.failovers, kind) + 1)
        if self.metrics is not None:
            self.metrics.failovers.labels(self.metrics.model, kind).inc()

    @staticmethod
    async def _quietly(call) -> None:
        try:
            await call
        except (UnknownRequest, StateStoreUnavailable, ValueError) as e:
            log.warning("state store: %s", e)


def _params_dict(params: SamplingParams, drafter: str) -> dict:
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
    return {**d, "drafter": drafter}


def _params_of(record: RequestRecord) -> SamplingParams:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.params.items()
                             if k in names})
