"""A real OTLP/gRPC trace collector on a local port, for tests whose spans come from other
processes (Ray workers): it keeps every span it is sent, flattened."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    attributes: dict
    links: tuple[bytes, ...]  # the span ids it links to


class OtlpCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[CollectedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server.start()

    def Export(self, request, context):  # noqa: N802 (the gRPC method's name)
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                with self._lock:
                    self.spans += [CollectedSpan(
                        resource.get("service.name", ""), s.name, s.trace_id, s.span_id, s.parent_span_id,
                        {a.key: _value(a.value) for a in s.attributes}, tuple(link.span_id for link in s.links),
                    ) for s in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[CollectedSpan]:
        with self._lock:
            return [s for s in self.spans if s.name == name]

    def stop(self) -> None:
        self._server.stop(grace=None)


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None
