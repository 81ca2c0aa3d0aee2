"""Runs a step loop (an in-process engine or a deployment of stage workers) on a thread of its own.

The engine is not thread-safe and its steps block for a forward pass, so the asyncio server
never touches it: it sends commands (add, abort, a query) to the driver thread, which runs
them between steps, and receives each request's outputs through the callback it registered,
called on the event loop's thread.

Build the engine on this thread too (`build`): torch's OpenMP pool belongs to the thread that
first ran a parallel region, and while that thread lives, another thread's forward passes run
with a team of their own. On 2 cores, an engine loaded on one thread and stepped on another
took 47 ms a step where it took 39 ms stepped where it was loaded (8 SmolLM2 requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from opentelemetry import trace

from services.runtime.request import RequestOutput
from services.runtime.step_loop import StepLoop

log = logging.getLogger(__name__)
T = TypeVar("T")
OnOutput = Callable[[RequestOutput], None]


class EngineDriver:
    def __init__(self, loop: StepLoop | None = None, idle_wait_s: float = 0.05,
                 tracer: trace.Tracer | None = None) -> None:
        self.loop = loop  # None until `build` has made it
        self.tracer = tracer or trace.NoOpTracer()
        self._tracing = not isinstance(self.tracer, trace.NoOpTracer)
        self._spans: dict[str, trace.SpanContext] = {}  # request -> its trace's root, linked from step spans
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[tuple[Callable[[StepLoop], Any], Future]] = queue.SimpleQueue()
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, OnOutput]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    # --- called from the event loop ----------------------------------------------------------------
    async def call(self, fn: Callable[[StepLoop], T]) -> T:
        """Run `fn(step_loop)` on the driver thread between steps; its exception is raised here."""
        if self._stopping.is_set():
            raise RuntimeError("the engine driver has stopped")
        done: Future = Future()
        self._commands.put((fn, done))
        return await asyncio.wrap_future(done)

    async def build(self, make: Callable[[], T], step_loop: Callable[[T], StepLoop]) -> T:
        """Run `make()` on the driver thread (the model loads where it will step) and drive
        `step_loop(what it made)` from then on."""
        if self.loop is not None:
            raise RuntimeError("the engine driver already drives a step loop")

        def build(_: StepLoop | None) -> T:
            made = make()
            self.loop = step_loop(made)
            return made

        return await self.call(build)

    async def add(self, request_id: str, prompt: Any, params: Any, on_output: OnOutput,
                  span: trace.SpanContext | None = None) -> None:
        """Queue a request; `on_output` gets its outputs on this event loop. Bad input raises here.
        `span`: the request's trace, which the spans of the steps that serve it link to."""
        aio = asyncio.get_running_loop()

        def add(step_loop: StepLoop) -> None:
            with _current(span):  # a deployment carries the request's trace to its worker
                step_loop.add_request(prompt, params, request_id=request_id)
            self._listeners[request_id] = (aio, on_output)  # registered only once admitted
            if span is not None:
                self._spans[request_id] = span

        await self.call(add)

    async def abort(self, request_id: str) -> bool:
        def abort(step_loop: StepLoop) -> bool:
            self._listeners.pop(request_id, None)
            self._spans.pop(request_id, None)
            return step_loop.abort(request_id)

        return await self.call(abort)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)

    # --- the driver thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            self._run_commands(block=not self._busy())
            if self._busy():
                self._step()
        while not self._commands.empty():  # nobody will run these now
            _, done = self._commands.get_nowait()
            done.set_exception(RuntimeError("the engine driver has stopped"))

    def _busy(self) -> bool:
        return self.loop is not None and self.loop.has_unfinished_requests()

    def _run_commands(self, block: bool) -> None:
        try:
            fn, done = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn(self.loop))
                except BaseException as e:  # reported to the caller, never kills the thread
                    done.set_exception(e)
            try:
                fn, done = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        start_ns = time.time_ns()
        before = self._totals() if self._tracing else {}
        # Current while the loop steps, so a deployment carries it into its workers' calls.
        step = self.tracer.start_span("tandem.step", start_time=start_ns) if self._tracing else None
        try:
            with trace.use_span(step, end_on_exit=False) if step is not None else contextlib.nullcontext():
                outputs = self.loop.step()
            if step is not None:
                self._trace_step(step, outputs, start_ns, before)
        except Exception:  # a bug in a step: fail what is running rather than hang every stream
            if step is not None:
                step.end()
            log.exception("engine step failed; failing its requests")
            outputs = [_failed(rid, "the engine step failed (logged at the server)") for rid in list(self._listeners)]
            for rid in list(self._listeners):
                self._abort_quietly(rid)
        for out in outputs:
            listener = self._listeners.get(out.request_id)
            if out.finished:
                self._listeners.pop(out.request_id, None)
                self._spans.pop(out.request_id, None)
            if listener is not None:
                aio, on_output = listener
                try:
                    aio.call_soon_threadsafe(on_output, out)
                except RuntimeError:  # its event loop has closed
                    pass

    def _totals(self) -> dict[str, float]:
        """Running totals that tell what a step spent its time on, where the loop keeps them."""
        totals = dict(self.loop.speculation_counters()) if hasattr(self.loop, "speculation_counters") else {}
        transfer = getattr(self.loop, "transfer", None)
        if transfer is not None:
            totals["transfer_seconds"], totals["transfer_bytes"] = transfer.seconds, transfer.bytes
        return totals

    def _trace_step(self, step: trace.Span, outputs: list[RequestOutput], start_ns: int,
                    before: dict[str, float]) -> None:
        """The span of a batched step, linked to every request it served; inside it, the time it
        spent drafting, verifying (the forward pass) and moving KV, as the loop measured them."""
        end_ns = time.time_ns()
        after = self._totals()
        delta = {k: v - before.get(k, 0) for k, v in after.items()}
        for o in outputs:
            if o.request_id in self._spans:
                step.add_link(self._spans[o.request_id])
        step.set_attributes({
            "tandem.step.requests": len(outputs),
            "tandem.step.tokens": sum(len(o.new_token_ids) for o in outputs),
            "tandem.step.draft_tokens": int(delta.get("draft_tokens", 0)),
            "tandem.step.accepted_tokens": int(delta.get("accepted_tokens", 0)),
        })
        parent = trace.set_span_in_context(step)
        at = start_ns
        for name, seconds in (("tandem.draft", delta.get("draft_seconds", 0.0)),
                              ("tandem.verify", delta.get("forward_seconds", 0.0)),
                              ("tandem.kv_transfer", delta.get("transfer_seconds", 0.0))):
            if seconds > 0:
                span = self.tracer.start_span(name, context=parent, start_time=at)
                if name == "tandem.kv_transfer":
                    span.set_attribute("tandem.kv_transfer.bytes", int(delta["transfer_bytes"]))
                at = min(end_ns, at + int(seconds * 1e9))
                span.end(end_time=at)
        step.end(end_time=end_ns)

    def _abort_quietly(self, request_id: str) -> None:
        try:
            self.loop.abort(request_id)
        except Exception:
            log.exception("abort of %s failed", request_id)


def _current(span: trace.SpanContext | None) -> contextlib.AbstractContextManager:
    """Make a span (known by its context) current in this thread; nothing when None."""
    if span is None:
        return contextlib.nullcontext()
    return trace.use_span(trace.NonRecordingSpan(span), end_on_exit=False)


def _failed(request_id: str, error: str) -> RequestOutput:
    return RequestOutput(request_id, [], "", [], "", finished=True, finish_reason="error", prompt_tokens=0,
                         cached_prompt_tokens=0, error=error)
