"""OpenTelemetry traces: one trace per request, following the GenAI semantic conventions.

    tandem.generate (SERVER; parent: the client's W3C `traceparent` metadata, if any)
      tandem.admission       waiting for room (running requests, KV budget)
      tandem.prefill         dispatch to the first token
      tandem.decode          first token to the end
      tandem.stream          a client stream of it (its Generate, a retry, a Resume)
    tandem.step              one engine step for the whole batch, linked to each request it served;
      tandem.draft, tandem.verify, tandem.kv_transfer   what the step spent its time on
      tandem.worker.step, tandem.kv.send, tandem.kv.receive, tandem.worker.reserve
                             in a Ray deployment, each worker's part (exported by the worker)
        tandem.draft.propose a verify worker's call to its draft worker

The request's admission on its entry worker (`tandem.worker.add`) is in the request's own
trace. The context crosses into the Ray actors with each call (services/workers/tracing.py).

Each server has its own TracerProvider (no global state): spans go to an OTLP collector when
`otlp_endpoint` is set, to any exporter given (tests use an in-memory one), or nowhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TracingConfig:
    otlp_endpoint: str | None = None
    """An OTLP/gRPC collector, e.g. http://otel-collector:4317; None exports nowhere (unless an
    exporter is handed to the server)."""
    service_name: str = "tandem"


def make_tracer(config: TracingConfig, exporter: SpanExporter | None = None,
                ) -> tuple[trace.Tracer, TracerProvider | None]:
    """The server's tracer (a no-op one when spans would go nowhere) and its provider, to shut down."""
    if config.otlp_endpoint is None and exporter is None:
        return trace.NoOpTracer(), None
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if config.otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
    return provider.get_tracer("tandem"), provider


def client_context(metadata: Iterable[tuple[str, str | bytes]] | None):
    """The trace context a client sent (`traceparent` / `tracestate` metadata), or None."""
    carrier = {k: v for k, v in (metadata or ()) if k in ("traceparent", "tracestate") and isinstance(v, str)}
    return _PROPAGATOR.extract(carrier) if carrier else None


def request_attributes(model: str, prompt_kind: str, params, request_id: str) -> dict:
    """GenAI semantic-convention attributes of a request, as admitted."""
    return {
        "gen_ai.operation.name": "chat" if prompt_kind == "chat" else "text_completion",
        "gen_ai.system": "tandem",
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.top_k": params.top_k,
        "gen_ai.response.id": request_id,
        "tandem.request.speculation": params.speculation,
    }
