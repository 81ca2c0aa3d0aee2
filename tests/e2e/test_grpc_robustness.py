"""The gRPC server under hostile and heavy traffic: property-based malformed requests, undecodable
bytes, and 64 concurrent streams against small admission limits. The server must answer each with a
status, stay up, leave other streams' tokens untouched, and hold no KV or state afterwards."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.admission import AdmissionConfig
from orchestrator.backend import embedded_backend
from orchestrator.lifecycle import LifecycleConfig
from orchestrator.server import ServerConfig
from orchestrator.server_thread import ServerThread
from orchestrator.state import MemoryStateStore
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.sampling_params import SamplingParams
from tandem.v1 import tandem_pb2 as pb
from tests.conftest import assert_no_leaks
from tests.grpc_harness import stub as tandem_stub

CANARY = [7, 8, 9, 10]
# Statuses a malformed request may get; never INTERNAL (a bug) or UNKNOWN (an unhandled exception).
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK}


@pytest.fixture(scope="module")
def server(tiny):
    engine = LLMEngine(EngineConfig(model=str(tiny.hf_dir), num_kv_blocks=256), loaded=tiny)
    store = MemoryStateStore(retention_s=0.5)
    config = ServerConfig(port=0, admission=AdmissionConfig(max_running_requests=4, max_queued_requests=8),
                          lifecycle=LifecycleConfig(detach_grace_s=0.2))
    running = ServerThread(config, embedded_backend(engine), store)
    yield running, engine, store
    running.stop()
    assert_no_leaks(engine)


@pytest.fixture(scope="module")
def canary_tokens(tiny) -> list[int]:
    engine = LLMEngine(EngineConfig(model=str(tiny.hf_dir)), loaded=tiny)
    return engine.generate([CANARY], SamplingParams(max_tokens=60, ignore_eos=True))[0].token_ids


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 2.0]))
sampling = st.builds(
    pb.SamplingParams,
    temperature=floats, top_p=floats, top_k=st.integers(0, 2**32 - 1),
    max_tokens=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20), stop_token_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4),
)
prompts = st.one_of(
    st.builds(lambda t: pb.GenerateRequest(text=t), st.text(max_size=200)),
    st.builds(lambda ids: pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=ids)),
              st.lists(st.integers(0, 2**32 - 1), max_size=40)),
    st.builds(lambda ms: pb.GenerateRequest(chat=pb.ChatPrompt(messages=ms)),
              st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "", "root"]),
                                 content=st.text(max_size=50)), max_size=4)),
    st.just(pb.GenerateRequest()),
)


@st.composite
def requests(draw) -> pb.GenerateRequest:
    req = draw(prompts)
    req.sampling.CopyFrom(draw(sampling))
    req.model = draw(st.sampled_from(["", "", "nope"]))
    req.drafter = draw(st.sampled_from(["", "auto", "none", "bogus"]))
    req.client_request_id = draw(st.sampled_from(["", "x" * 300]))
    req.images.extend(draw(st.lists(st.builds(pb.Image, data=st.binary(max_size=64)), max_size=2)))
    return req


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_malformed_requests_each_get_a_status_and_hurt_no_other_stream(server, canary_tokens, request):
    running, _, _ = server
    with grpc.insecure_channel(running.address) as channel:
        stub = tandem_stub(channel)
        canary = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=CANARY), sampling=pb.SamplingParams(
            max_tokens=60, ignore_eos=True)))
        try:
            for _ in stub.Generate(request, timeout=30):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert ":" in e.details(), "the field is named"
        assert code in EXPECTED, (code, request)
        tokens = [t for m in canary if m.HasField("chunk") for t in m.chunk.token_ids]
        assert tokens == canary_tokens


def test_undecodable_bytes_get_a_status_and_the_server_stays_up(server):
    running, _, _ = server
    with grpc.insecure_channel(running.address) as channel:
        raw = channel.unary_stream("/tandem.v1.Tandem/Generate", request_serializer=None,
                                   response_deserializer=None)
        for junk in (b"\xff\xff\xff\xff", b"\x12\x05abc", bytes(range(256))):
            with pytest.raises(grpc.RpcError) as err:
                list(raw(junk, timeout=10))
            assert err.value.code() != grpc.StatusCode.OK
        reply = tandem_stub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert reply.models


def test_sixty_four_streams_against_small_limits_complete_or_are_refused(server, canary_tokens):
    running, engine, store = server
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        request = pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=CANARY), sampling=pb.SamplingParams(
            max_tokens=60, ignore_eos=True))
        with grpc.insecure_channel(running.address) as channel:
            try:
                tokens = [t for m in tandem_stub(channel).Generate(request, timeout=120)
                          if m.HasField("chunk") for t in m.chunk.token_ids]
                outcome = "ok" if tokens == canary_tokens else f"wrong tokens in stream {i}"
            except grpc.RpcError as e:
                outcome = e.code().name
        with lock:
            outcomes.append(outcome)

    for _ in range(2):  # the second wave finds the server as the first left it
        with ThreadPoolExecutor(64) as pool:
            list(pool.map(one, range(64)))
        assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED"}, set(outcomes)
        assert outcomes.count("ok") >= 12  # 4 running + 8 queued were admitted at the least
        outcomes.clear()
        manager = running.server.manager
        assert not manager.runs and manager.waiting == 0
        assert manager.admission.running == 0 and manager.admission.claimed == 0
        assert engine.block_manager.num_used_blocks == 0 and not engine.requests
    time.sleep(0.6)  # retention: ended requests leave the store
    assert running.run(store.unfinished()) == []
    assert "records=0" in repr(store), "ended requests are retired from memory"
