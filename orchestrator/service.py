"""The `tandem.v1.Tandem` gRPC service: translates between the API's messages and the request manager.

Errors become status codes here and nowhere else: INVALID_ARGUMENT names the field,
RESOURCE_EXHAUSTED means full, NOT_FOUND an unknown request id, UNAVAILABLE a state store
that does not answer, DEADLINE_EXCEEDED a deadline that passed (the request is stopped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from orchestrator.backend import Backend
from orchestrator.engine_driver import EngineDriver
from orchestrator.lifecycle import LEASE, RequestManager
from orchestrator.security import ANONYMOUS, StreamLimiter, caller_key
from orchestrator.session import Delta, Ending, RequestSession
from orchestrator.state import RequestRecord, RequestStatus, StateStore, StateStoreUnavailable
from orchestrator.tracing import client_context
from orchestrator.validation import RequestValidator
from services.runtime.errors import InvalidRequestError, ResourceExhaustedError
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
VERSION = "0.1.0"
STORE_POLL_S = 0.05  # how often a stream of a request running on another replica reads the store
_TEXT_CONTEXT = 4  # tokens decoded before a stored chunk, so its text starts as the full text does

_STATUS = {
    RequestStatus.QUEUED: pb.REQUEST_STATUS_QUEUED, RequestStatus.RUNNING: pb.REQUEST_STATUS_RUNNING,
    RequestStatus.FINISHED: pb.REQUEST_STATUS_FINISHED, RequestStatus.FAILED: pb.REQUEST_STATUS_FAILED,
    RequestStatus.CANCELLED: pb.REQUEST_STATUS_CANCELLED,
}


class TandemService(pb_grpc.TandemServicer):
    def __init__(self, backend: Backend, driver: EngineDriver, manager: RequestManager, validator: RequestValidator,
                 store: StateStore, store_kind: str, limiter: StreamLimiter | None = None) -> None:
        self.backend = backend
        self.driver = driver
        self.manager = manager
        self.validator = validator
        self.store = store
        self.store_kind = store_kind
        self.limiter = limiter or StreamLimiter(None)

    # --- streaming -------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext,
                       ) -> AsyncIterator[pb.GenerateResponse]:
        async with self._stream_slot(context):
            try:
                valid = await asyncio.to_thread(self.validator.validate, request)  # tokenizing is CPU work
                async with asyncio.timeout(context.time_remaining()):  # the deadline holds in the queue too
                    record, _ = await self.manager.submit(valid, client_context(context.invocation_metadata()))
            except TimeoutError:
                await self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "the deadline passed while the request waited for admission")
            except InvalidRequestError as e:
                await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except ResourceExhaustedError as e:
                await self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            except StateStoreUnavailable as e:
                await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                                   f"the request state store does not answer: {e}")
            async for message in self._stream(record, 0, context):
                yield message

    def _stream_slot(self, context: grpc.aio.ServicerContext):
        """One of the caller's key's concurrent streams, or RESOURCE_EXHAUSTED."""
        key = caller_key(context.invocation_metadata()) or ANONYMOUS
        return self.limiter.slot(key, lambda why: self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, why))

    async def _refuse(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
        metrics = self.manager.metrics
        if metrics is not None:
            metrics.rejected.labels(metrics.model, code.name).inc()
        await context.abort(code, details)

    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext,
                     ) -> AsyncIterator[pb.GenerateResponse]:
        async with self._stream_slot(context):
            record = await self._record(request.request_id, context)
            async for message in self._stream(record, request.from_index, context):
                yield message

    async def _stream(self, record: RequestRecord, from_index: int, context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[pb.GenerateResponse]:
        rid = record.request_id
        session = self.manager.session(rid)
        source = session.follow(from_index) if session is not None else self._from_store(record, from_index)
        prompt_tokens, sent = len(record.prompt_token_ids), from_index
        remaining = context.time_remaining()
        finished = False
        span = self.manager.tracer.start_span("tandem.stream", context=self.manager.trace_context(rid),
                                              attributes={"tandem.stream.from_index": from_index})
        try:
            async with asyncio.timeout(remaining):
                async for item in source:
                    if isinstance(item, Delta):
                        sent = item.index + len(item.token_ids)
                        usage = self._usage(prompt_tokens, sent, session)
                        yield pb.GenerateResponse(request_id=rid, chunk=pb.Chunk(
                            index=item.index, token_ids=item.token_ids, text=item.text, usage=usage))
                    else:
                        finished = True
                        yield pb.GenerateResponse(request_id=rid, complete=pb.Complete(
                            finish_reason=item.finish_reason, usage=self._usage(prompt_tokens, sent, session),
                            error=item.error or ""))
        except TimeoutError:
            finished = True
            await self.manager.cancel(rid, reason="error", error="the client's deadline passed")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"request {rid}: the deadline passed after {sent} tokens; it was stopped")
        finally:
            span.set_attribute("tandem.stream.tokens_sent", sent - from_index)
            span.end()
            if not finished:
                self.manager.detached(rid)  # client gone: cancelled after a grace time unless resumed

    async def _from_store(self, record: RequestRecord, from_index: int) -> AsyncIterator[Delta | Ending]:
        """Follow a request that runs on another replica (or has ended) through the state store; if
        that replica's lease runs out, take the request over and follow it here."""
        rid, index = record.request_id, from_index
        decode = self.backend.tokenizer.decode
        context = await self.store.tokens(rid, max(0, index - _TEXT_CONTEXT), index)  # for the first text
        while True:
            record = await self.store.get(rid) or record
            ids = await self.store.tokens(rid, index)
            if ids:
                text = decode(context + ids)[len(decode(context)):]
                yield Delta(index, tuple(ids), text)
                index += len(ids)
                context = (context + ids)[-_TEXT_CONTEXT:]
            if record.status.terminal:
                yield Ending(record.finish_reason or "stop", record.error)
                return
            if await self.store.lease_owner(rid, LEASE) is None:
                session = await self.manager.adopt(record)
                if session is not None:
                    async for item in session.follow(index):
                        yield item
                    return
            await asyncio.sleep(STORE_POLL_S)

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int, session: RequestSession | None) -> pb.Usage:
        return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                        cached_prompt_tokens=session.cached_prompt_tokens if session else 0,
                        time_to_first_token_s=session.time_to_first_token_s if session else 0.0)

    # --- unary -----------------------------------------------------------------------------------
    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        before = await self._record(request.request_id, context)
        status = await self.manager.cancel_anywhere(request.request_id)
        cancelled = not before.status.terminal and status == RequestStatus.CANCELLED
        return pb.CancelResponse(cancelled=cancelled, status=_STATUS[status or before.status])

    async def GetRequest(self, request: pb.GetRequestRequest, context: grpc.aio.ServicerContext) -> pb.RequestState:
        record = await self._record(request.request_id, context)
        tokens = await self.store.tokens(record.request_id)
        return pb.RequestState(request_id=record.request_id, status=_STATUS[record.status], token_ids=tokens,
                               finish_reason=record.finish_reason or "", error=record.error or "",
                               model=record.model, prompt_tokens=len(record.prompt_token_ids))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext,
                         ) -> pb.ListModelsResponse:
        card = self.backend.model
        drafters = [d for d in self.validator.drafters if d]
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=card.name, max_model_len=card.max_model_len,
                                                          vocab_size=card.vocab_size, drafters=drafters)])

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext,
                            ) -> pb.ServerInfo:
        snap = await self.driver.call(lambda _: self.backend.snapshot())
        pools: dict[str, list[pb.WorkerInfo]] = {}
        for w in snap.loads:
            pools.setdefault(w.stage, []).append(pb.WorkerInfo(
                worker_id=w.worker_id, running_requests=w.running + w.waiting, queued_tokens=w.queued_tokens,
                kv_blocks_used=w.used_blocks, kv_blocks_free=w.free_blocks))
        return pb.ServerInfo(version=VERSION, replica_id=self.manager.replica_id,
                             deployment_mode=self.backend.mode, state_store=self.store_kind,
                             pools=[pb.PoolInfo(stage=s, workers=ws) for s, ws in pools.items()],
                             running_requests=len(self.manager.runs), speculation=_speculation(
                                 self.backend.model.drafter, snap.speculation))

    async def _record(self, request_id: str, context: grpc.aio.ServicerContext) -> RequestRecord:
        if not request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: expected a request id")
        try:
            record = await self.store.get(request_id)
        except StateStoreUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the request state store does not answer: {e}")
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no request {request_id!r}")
        return record


def _speculation(drafter: str, c: dict[str, float]) -> pb.SpeculationStats:
    steps, tokens = int(c.get("decode_steps", 0)), int(c.get("decode_tokens", 0))
    drafted, accepted = int(c.get("draft_tokens", 0)), int(c.get("accepted_tokens", 0))
    return pb.SpeculationStats(drafter=drafter, decode_steps=steps, decode_tokens=tokens,
                               drafts=int(c.get("drafts", 0)), draft_tokens=drafted, accepted_tokens=accepted,
                               mean_accepted_tokens=tokens / steps if steps else 0.0,
                               acceptance_rate=accepted / drafted if drafted else 0.0,
                               steps=int(c.get("steps", 0)), forward_seconds=c.get("forward_seconds", 0.0),
                               draft_seconds=c.get("draft_seconds", 0.0),
                               expected_accepted=c.get("expected_accepted", 0.0),
                               controlled_accepted=int(c.get("controlled_accepted", 0)),
                               controlled_steps=int(c.get("controlled_steps", 0)),
                               predicted_seconds=c.get("predicted_seconds", 0.0),
                               controlled_seconds=c.get("controlled_seconds", 0.0))
