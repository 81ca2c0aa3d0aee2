"""Trace context across Ray calls.

The caller of a worker method (the deployment, or a verify worker asking its draft worker
for trees) passes `current_carrier()`: the W3C trace context of the span current in its
thread, as a small dict — empty when nothing is being traced. The worker opens its span as
that span's child (`WorkerTracer.span`), so one trace shows the orchestrator's batched step
and what each worker did for it: its forward pass, a KV send or receive, a remote draft.

Workers export with OTLP when the standard OpenTelemetry variables are set in their
environment (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`): the deployment sets them
on every actor it starts when it is given an endpoint (DeploymentConfig.otlp_endpoint).
With no endpoint, or an empty carrier, a worker records nothing and pays nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
ENDPOINT_VAR = "OTEL_EXPORTER_OTLP_ENDPOINT"
SERVICE_VAR = "OTEL_SERVICE_NAME"


def current_carrier() -> dict[str, str]:
    """The trace context of this thread's current span, to send along with a remote call."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _PROPAGATOR.inject(carrier)
    return carrier


def export_env(endpoint: str | None, service_name: str) -> dict[str, str]:
    """Environment variables that make a worker export its spans to `endpoint`."""
    return {ENDPOINT_VAR: endpoint, SERVICE_VAR: service_name} if endpoint else {}


class WorkerTracer:
    """A worker's spans, exported by OTLP where its environment names a collector."""

    def __init__(self, worker_id: str, stage: str) -> None:
        self.attributes = {"tandem.worker.id": worker_id, "tandem.stage": stage}
        self._provider = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        endpoint = os.environ.get(ENDPOINT_VAR)
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            resource = Resource.create({"service.name": os.environ.get(SERVICE_VAR, f"tandem-{stage}"),
                                        "service.instance.id": worker_id})
            self._provider = TracerProvider(resource=resource)
            self._provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://")),
                schedule_delay_millis=500))
            self._tracer = self._provider.get_tracer("tandem.worker")

    @contextlib.contextmanager
    def span(self, name: str, carrier: dict[str, str] | None, **attributes) -> Iterator[trace.Span]:
        """A child of the caller's span (none when the call carried no context); current while
        the block runs, so calls the worker makes from it carry it on."""
        if not carrier or self._provider is None:
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(name, context=_PROPAGATOR.extract(carrier),
                                                kind=trace.SpanKind.SERVER,
                                                attributes={**self.attributes, **attributes}) as span:
            yield span

    def flush(self, timeout_ms: int = 5000) -> bool:
        """Export what is batched (before the worker is stopped)."""
        return self._provider.force_flush(timeout_ms) if self._provider is not None else True


def traced(name: str, per_request: bool = False) -> Callable[[Callable], Callable]:
    """Give a worker method a `trace` keyword (a carrier from `current_carrier()`) and run it in
    a span of that name. `per_request`: its first argument is a request id, set on the span.
    (No functools.wraps: Ray reads the signature through __wrapped__ and would refuse `trace`.)"""

    def wrap(method: Callable) -> Callable:
        def call(self, *args: Any, trace: dict[str, str] | None = None, **kwargs: Any) -> Any:
            attributes = {"tandem.request.id": args[0]} if per_request and args else {}
            with self.tracer.span(name, trace, **attributes):
                return method(self, *args, **kwargs)

        call.__name__, call.__qualname__, call.__doc__ = method.__name__, method.__qualname__, method.__doc__
        return call

    return wrap
