"""API keys, TLS and per-key stream limits on the gRPC port, over real sockets."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.backend import embedded_backend
from orchestrator.client import TandemClient, build_request
from orchestrator.security import SecurityConfig
from orchestrator.server import ServerConfig
from orchestrator.server_thread import ServerThread
from orchestrator.validation import RequestLimits
from services.runtime.engine import EngineConfig, LLMEngine
from tandem.v1 import tandem_pb2 as pb
from tests.conftest import assert_no_leaks
from tests.grpc_harness import serving

TOKENS = build_request(token_ids=[5, 6, 7], max_tokens=4)


@pytest.fixture
def engine(tiny):
    e = LLMEngine(EngineConfig(model=str(tiny.hf_dir)), loaded=tiny)
    yield e
    assert_no_leaks(e)


def _secured(**security) -> ServerConfig:
    return ServerConfig(port=0, security=SecurityConfig(**security))


def test_api_keys_are_required_except_by_the_health_service(engine):
    with serving(_secured(api_keys=("k-one", "k-two")), embedded_backend(engine)) as (server, stub):
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "k-one"),)):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(TOKENS, metadata=metadata))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in ("k-one", "k-two"):
            with TandemClient(server.address, api_key=key) as client:
                assert len(client.generate(TOKENS).token_ids) == 4
        with grpc.insecure_channel(server.address) as channel:  # Kubernetes probes send no metadata
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_key_may_hold_only_so_many_streams(engine):
    long = build_request(token_ids=[5, 6, 7], max_tokens=400, ignore_eos=True)
    with serving(_secured(api_keys=("a", "b"), max_streams_per_key=1), embedded_backend(engine)) as (server, _):
        with TandemClient(server.address, api_key="a") as a, TandemClient(server.address, api_key="b") as b:
            held = a.stream(long)
            rid = next(held).request_id
            with pytest.raises(grpc.RpcError) as err:
                a.generate(TOKENS)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams" in err.value.details()
            assert len(b.generate(TOKENS).token_ids) == 4  # another key is not held back
            a.stub.Cancel(pb.CancelRequest(request_id=rid), metadata=(("authorization", "Bearer a"),))
            list(held)
            assert len(a.generate(TOKENS).token_ids) == 4  # its slot is free again


def test_an_oversized_request_is_invalid_argument_naming_its_field(engine):
    config = ServerConfig(port=0, limits=RequestLimits(max_request_bytes=1000))
    with serving(config, embedded_backend(engine)) as (_, stub):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(build_request("x" * 1500, max_tokens=2)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("text: the request is")
        with pytest.raises(grpc.RpcError) as err:  # past the transport's cap: refused unread
            list(stub.Generate(build_request("x" * 5000, max_tokens=2)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_tls_serves_only_clients_that_speak_it(engine, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    server = ServerThread(_secured(tls_cert_file=cert, tls_key_file=key), embedded_backend(engine))
    try:
        with TandemClient(server.address, root_certificates=cert.read_bytes()) as client:
            assert len(client.generate(TOKENS).token_ids) == 4
        with TandemClient(server.address) as plain, pytest.raises(grpc.RpcError) as err:
            plain.generate(TOKENS, timeout_s=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()
