"""Failover through the gRPC orchestrator: a worker killed mid-generation, an orchestrator replica
killed (SIGKILL) mid-generation, and Redis restarted with nothing on disk. In each case the
client's tokens equal an undisturbed run's, with none repeated or skipped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest
import ray

from orchestrator.backend import embedded_backend
from orchestrator.lifecycle import LifecycleConfig
from orchestrator.server import ServerConfig
from orchestrator.state import open_store
from services.cluster.config import DeploymentConfig, PoolConfig
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.sampling_params import SamplingParams
from tandem.v1 import tandem_pb2 as pb
from tandem.v1.tandem_pb2_grpc import TandemStub
from tests.conftest import make_tiny_hf_dir
from tests.grpc_harness import serving
from tests.redis_server import RedisServer, drop_keys, free_port, redis_binary

PROMPT = list(range(30, 52))
GREEDY = dict(max_tokens=120, ignore_eos=True)
SEEDED = dict(max_tokens=120, ignore_eos=True, temperature=0.9, seed=11)


def _request(**sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=PROMPT), sampling=pb.SamplingParams(**sampling))


def _reference(loaded, **sampling) -> list[int]:
    engine = LLMEngine(EngineConfig(model=str(loaded.hf_dir)), loaded=loaded)
    return engine.generate([PROMPT], SamplingParams(**sampling))[0].token_ids


def _collect(stream, start: int = 0, until: int | None = None) -> tuple[str, list[int], pb.GenerateResponse]:
    """Read a stream whose first token is output token `start` to its end (or until `until` tokens
    have come); the request id, tokens, last message."""
    tokens: list[int] = []
    for message in stream:
        if message.HasField("chunk"):
            assert message.chunk.index == start + len(tokens), "a token repeated or skipped"
            tokens += message.chunk.token_ids
            if until is not None and len(tokens) >= until:
                break
    return message.request_id, tokens, message


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded-sampling"])
def test_a_worker_killed_mid_generation_is_replaced_without_the_client_noticing(ray_cluster, tiny, tiny_dir,
                                                                                 sampling):
    expected = _reference(tiny, **sampling)
    engine = EngineConfig(model=str(tiny_dir), num_kv_blocks=96, block_size=4)
    deployment = DeploymentConfig(mode="colocated", engine=engine, colocated=PoolConfig(num_cpus=0, replicas=2))
    config = ServerConfig(port=0, mode="colocated", engine=engine, deployment=deployment)
    with serving(config) as (server, stub):
        stream = stub.Generate(_request(**sampling))
        rid, seen, _ = _collect(stream, until=10)
        on_driver = server.server.driver.call  # the deployment is the driver thread's alone
        victim = server.run(on_driver(lambda d: d.worker_of(rid)))
        server.run(on_driver(lambda d: ray.kill(d.pools["colocated"].replicas[victim].handle, no_restart=True)))
        _, rest, final = _collect(stream, start=len(seen))
        assert final.complete.finish_reason == "length", final
        assert seen + rest == expected
        assert server.server.manager.failovers.redispatches == 1  # it did run on after the kill
        state = stub.GetRequest(pb.GetRequestRequest(request_id=rid))
        assert list(state.token_ids) == expected and state.status == pb.REQUEST_STATUS_FINISHED
        workers = server.run(on_driver(lambda d: d.workers()))
        assert victim not in workers and len(workers) == 1
        assert server.run(on_driver(lambda d: [d.call(w, "leaked_blocks") for w in workers])) == [[]]


def test_a_killed_orchestrator_replicas_request_resumes_on_another_replica(smollm2_dir, tmp_path, redis_url):
    """Replica A is a `tandem serve` process, SIGKILLed mid-stream; the client resumes on replica B,
    which takes over A's lease once it expires and runs the request on from the stored tokens."""
    from services.runtime.loader import load_model

    model_dir = make_tiny_hf_dir(tmp_path / "tiny", smollm2_dir, vocab_size=49152, num_hidden_layers=2)
    loaded = load_model(str(model_dir))
    sampling = dict(max_tokens=200, ignore_eos=True, temperature=0.8, seed=3)
    expected = _reference(loaded, **sampling)
    prefix = f"tandem-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    replica_a = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--redis", redis_url, "--redis-prefix", prefix, "--lease-ttl-s", "1", "--drafter", "none",
         "--metrics-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=120)
            stream = TandemStub(channel).Generate(_request(**sampling))
            rid, seen, _ = _collect(stream, until=5)
            replica_a.send_signal(signal.SIGKILL)
            replica_a.wait(30)
        engine = LLMEngine(EngineConfig(model=str(model_dir)), loaded=loaded)
        config = ServerConfig(port=0, redis_url=redis_url, redis_prefix=prefix, lifecycle=LifecycleConfig(
            lease_ttl_s=1.0, heartbeat_s=0.3))
        with serving(config, embedded_backend(engine)) as (replica_b, stub):
            resumed = stub.Resume(pb.ResumeRequest(request_id=rid, from_index=len(seen)), timeout=120)
            _, rest, final = _collect(resumed, start=len(seen))
            assert final.complete.finish_reason == "length", final
            assert seen + rest == expected
            assert replica_b.server.manager.failovers.adoptions == 1
            state = stub.GetRequest(pb.GetRequestRequest(request_id=rid))
            assert list(state.token_ids) == expected and state.status == pb.REQUEST_STATUS_FINISHED
        assert not engine.requests and engine.block_manager.num_used_blocks == 0
    finally:
        if replica_a.poll() is None:
            replica_a.kill()
        drop_keys(redis_url, prefix)


@pytest.mark.skipif(redis_binary() is None, reason="needs the redis-server binary to restart a Redis of its own")
def test_requests_in_flight_finish_when_redis_restarts_empty_and_new_ones_are_served_after(tiny):
    long = dict(max_tokens=400, ignore_eos=True)  # still running when Redis goes
    expected = _reference(tiny, **long)
    with RedisServer() as redis_server:
        engine = LLMEngine(EngineConfig(model=str(tiny.hf_dir)), loaded=tiny)
        store = open_store(redis_server.url)
        config = ServerConfig(port=0, lifecycle=LifecycleConfig(heartbeat_s=0.2, store_retry_interval_s=0.1))
        with serving(config, embedded_backend(engine), store) as (server, stub):
            stream = stub.Generate(_request(**long))
            rid, seen, _ = _collect(stream, until=5)
            redis_server.restart()  # nothing kept: the record and its tokens are gone
            _, rest, final = _collect(stream, start=len(seen))
            assert final.complete.finish_reason == "length" and seen + rest == expected
            # The replica writes the request back once Redis answers again.
            state = _when_finished(stub, rid)
            assert list(state.token_ids) == expected
            assert server.server.manager.failovers.store_rewrites >= 1
            _, again, final = _collect(stub.Generate(_request(**long)))
            assert again == expected
        assert engine.block_manager.num_used_blocks == 0


def _when_finished(stub, rid: str, timeout_s: float = 10.0) -> pb.RequestState:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = stub.GetRequest(pb.GetRequestRequest(request_id=rid))
            if state.status == pb.REQUEST_STATUS_FINISHED:
                return state
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e  # not written back yet
        assert time.monotonic() < deadline, f"request {rid} never reached FINISHED in the store"
        time.sleep(0.05)
