"""OpenTelemetry traces of requests through the gRPC server, read from an in-memory exporter."""

from __future__ import annotations

import time

import grpc
import pytest
import ray
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from orchestrator.backend import embedded_backend
from orchestrator.server import ServerConfig
from orchestrator.server_thread import ServerThread
from orchestrator.tracing import TracingConfig
from services.cluster.config import DeploymentConfig, PoolConfig
from services.runtime.engine import EngineConfig, LLMEngine
from services.spec.config import SpecConfig
from tandem.v1 import tandem_pb2 as pb
from tests.grpc_harness import serving, stub
from tests.otlp_collector import OtlpCollector

CLIENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331


def test_one_trace_per_request_with_its_stages_and_the_clients_parent(tiny):
    engine = LLMEngine(EngineConfig(model=str(tiny.hf_dir), speculation=SpecConfig(drafter="ngram")), loaded=tiny)
    exporter = InMemorySpanExporter()
    server = ServerThread(ServerConfig(port=0), embedded_backend(engine), span_exporter=exporter)
    try:
        traceparent = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"
        request = pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=[5, 6, 7, 8, 5, 6, 7, 8]),
                                     sampling=pb.SamplingParams(max_tokens=24, ignore_eos=True))
        with grpc.insecure_channel(server.address) as channel:
            messages = list(stub(channel).Generate(request, metadata=(("traceparent", traceparent),)))
            list(stub(channel).Generate(request))  # a second request: a trace of its own
        rid = messages[-1].request_id
        time.sleep(0.1)
    finally:
        server.stop()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "tandem.generate"]
    assert len(roots) == 2 and len({r.context.trace_id for r in roots}) == 2
    root = next(r for r in roots if r.attributes["gen_ai.response.id"] == rid)
    assert root.context.trace_id == CLIENT_TRACE and root.parent.span_id == CLIENT_SPAN
    assert root.kind == SpanKind.SERVER
    attrs = root.attributes
    assert attrs["gen_ai.operation.name"] == "text_completion" and attrs["gen_ai.request.max_tokens"] == 24
    assert attrs["gen_ai.usage.input_tokens"] == 8 and attrs["gen_ai.usage.output_tokens"] == 24
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("length",)
    children = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert set(children) == {"tandem.admission", "tandem.prefill", "tandem.decode", "tandem.stream"}
    assert children["tandem.prefill"].end_time <= children["tandem.decode"].start_time
    assert children["tandem.stream"].attributes["tandem.stream.tokens_sent"] == 24
    # Batched steps link to the requests they served; inside them, drafting and the verify forward.
    steps = [s for s in spans if s.name == "tandem.step"
             and any(link.context.span_id == root.context.span_id for link in s.links)]
    assert steps and sum(s.attributes["tandem.step.tokens"] for s in steps) >= 24 - 1
    inner = {s.name for s in spans if s.parent is not None and s.parent.span_id in {x.context.span_id for x in steps}}
    assert {"tandem.draft", "tandem.verify"} <= inner


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_the_trace_context_goes_with_every_call_into_the_ray_workers(ray_cluster, tiny_dir):
    """Disaggregated: the server and its prefill and verify workers (Ray actors, processes of
    their own) export to one OTLP collector, a real gRPC one. The request's admission on the
    prefill worker is in the client's trace; each worker's step, and the KV send and receive of
    the hand-off, are children of the orchestrator's batched step that made the call."""
    collector = OtlpCollector()
    engine = EngineConfig(model=str(tiny_dir), num_kv_blocks=96, block_size=4,
                          speculation=SpecConfig(drafter="ngram"))
    deployment = DeploymentConfig(mode="disaggregated", engine=engine, prefill=PoolConfig(num_cpus=0),
                                  verify=PoolConfig(num_cpus=0))
    config = ServerConfig(port=0, mode="disaggregated", engine=engine, deployment=deployment,
                          tracing=TracingConfig(otlp_endpoint=collector.endpoint))
    traceparent = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"
    request = pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=[5, 6, 7, 8, 5, 6, 7, 8]),
                                 sampling=pb.SamplingParams(max_tokens=12, ignore_eos=True))
    try:
        with serving(config) as (_, client):
            messages = list(client.Generate(request, metadata=(("traceparent", traceparent),)))
        assert messages[-1].complete.finish_reason == "length"
    finally:
        collector.stop()  # the server and the deployment flushed their spans as they stopped

    [root] = collector.named("tandem.generate")
    assert root.service == "tandem" and root.trace_id == CLIENT_TRACE.to_bytes(16, "big")
    [add] = collector.named("tandem.worker.add")
    assert add.service == "tandem-prefill" and add.trace_id == root.trace_id
    assert add.attributes["tandem.request.id"] == messages[-1].request_id
    request_spans = {s.span_id for s in collector.spans if s.trace_id == root.trace_id}
    assert add.parent_span_id in request_spans  # under the request's own spans

    steps = {s.span_id: s for s in collector.named("tandem.step")}
    worker_steps = collector.named("tandem.worker.step")
    assert {s.service for s in worker_steps} == {"tandem-prefill", "tandem-verify"}
    for span in worker_steps + collector.named("tandem.kv.send") + collector.named("tandem.kv.receive"):
        parent = steps[span.parent_span_id]  # a KeyError here: a worker span outside any step
        assert span.trace_id == parent.trace_id
    [send], [receive] = collector.named("tandem.kv.send"), collector.named("tandem.kv.receive")
    assert (send.service, receive.service) == ("tandem-prefill", "tandem-verify")
    assert send.parent_span_id == receive.parent_span_id  # one hand-off, in one step...
    assert root.span_id in steps[send.parent_span_id].links  # ...which served this request
