"""The gRPC orchestrator end to end: real sockets, real gRPC clients, a real Redis for the state.

The server runs the embedded backend on a tiny random model (fast to load); what is checked is
the API's behaviour: streaming, cancel, deadlines, idempotent retries, Resume, health,
reflection, errors and that no KV block is left behind.
"""

from __future__ import annotations

import json
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from orchestrator.admission import AdmissionConfig
from orchestrator.backend import embedded_backend
from orchestrator.lifecycle import LifecycleConfig
from orchestrator.server import ServerConfig
from orchestrator.state import open_store
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.sampling_params import SamplingParams
from services.spec.config import SpecConfig
from tandem.v1 import tandem_pb2 as pb
from tests.conftest import assert_no_leaks
from tests.grpc_harness import serving
from tests.redis_server import drop_keys


@pytest.fixture
def engine(tiny):
    e = LLMEngine(EngineConfig(model=str(tiny.hf_dir), speculation=SpecConfig(drafter="ngram")), loaded=tiny)
    yield e
    assert_no_leaks(e)


@pytest.fixture
def redis_store(redis_url):
    prefix = f"tandem-test-{uuid.uuid4().hex[:8]}"
    yield open_store(redis_url, prefix=prefix)
    drop_keys(redis_url, prefix)


def _config(admission: AdmissionConfig = AdmissionConfig(), **lifecycle) -> ServerConfig:
    lifecycle.setdefault("detach_grace_s", 0.2)
    return ServerConfig(port=0, lifecycle=LifecycleConfig(**lifecycle), admission=admission)


def _prompt(ids=(5, 6, 7, 8), max_tokens=16, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=list(ids)),
                              sampling=pb.SamplingParams(max_tokens=max_tokens, **sampling))


def _drain(stream) -> tuple[list[int], list[pb.GenerateResponse]]:
    messages = list(stream)
    tokens = [t for m in messages if m.HasField("chunk") for t in m.chunk.token_ids]
    return tokens, messages


def _wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_generate_streams_the_engines_tokens_then_a_final_message(engine, tiny, redis_store):
    expected = LLMEngine(EngineConfig(model=str(tiny.hf_dir)), loaded=tiny).generate(
        [[5, 6, 7, 8]], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    with serving(_config(), embedded_backend(engine), redis_store) as (_, stub):
        tokens, messages = _drain(stub.Generate(_prompt(ignore_eos=True)))
        assert tokens == expected
        chunks = [m.chunk for m in messages[:-1]]
        assert [c.index for c in chunks] == [sum(len(c.token_ids) for c in chunks[:i]) for i in range(len(chunks))]
        final = messages[-1]
        assert final.HasField("complete") and final.complete.finish_reason == "length"
        assert final.complete.usage.prompt_tokens == 4 and final.complete.usage.completion_tokens == 16
        assert len({m.request_id for m in messages}) == 1
        state = stub.GetRequest(pb.GetRequestRequest(request_id=final.request_id))
        assert state.status == pb.REQUEST_STATUS_FINISHED and list(state.token_ids) == expected


def test_health_serving_reflection_lists_the_api_and_list_models(engine, redis_store):
    with serving(_config(), embedded_backend(engine), redis_store) as (server, stub):
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "tandem.v1.Tandem"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for r in replies for s in r.list_services_response.service}
            assert "tandem.v1.Tandem" in names and "grpc.health.v1.Health" in names
        models = stub.ListModels(pb.ListModelsRequest()).models
        assert [m.id for m in models] == [engine.loaded.name]
        assert set(models[0].drafters) == {"auto", "fixed", "none", "ngram"} and models[0].vocab_size == 512
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.deployment_mode == "embedded" and info.state_store == "redis"
        assert info.pools[0].workers[0].kv_blocks_free == engine.block_manager.num_blocks


@pytest.mark.parametrize("request_, field", [
    (pb.GenerateRequest(), "prompt"),
    (pb.GenerateRequest(text=""), "text"),
    (pb.GenerateRequest(token_ids=pb.TokenPrompt(ids=[1, 99999])), "token_ids.ids[1]"),
    (pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="robot", content="hi")])),
     "chat.messages[0].role"),
    (_prompt(temperature=-1.0), "sampling.temperature"),
    (_prompt(top_p=0.0), "sampling.top_p"),
    (_prompt(max_tokens=0), "sampling.max_tokens"),
    (_prompt(max_tokens=10**6), "sampling.max_tokens"),
    (pb.GenerateRequest(text="hi", model="gpt-9"), "model"),
    (pb.GenerateRequest(text="hi", drafter="telepathy"), "drafter"),
    (pb.GenerateRequest(text="hi", images=[pb.Image(data=b"\x89PNG")]), "images"),
])
def test_bad_input_is_invalid_argument_naming_the_field(engine, request_, field):
    with serving(_config(), embedded_backend(engine)) as (_, stub):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request_))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field + ":"), err.value.details()
        tokens, _ = _drain(stub.Generate(_prompt(max_tokens=3)))  # the server is still up
        assert len(tokens) >= 1


def test_cancel_ends_the_stream_and_frees_the_blocks(engine, redis_store):
    with serving(_config(), embedded_backend(engine), redis_store) as (_, stub):
        stream = stub.Generate(_prompt(max_tokens=400, ignore_eos=True))
        first = next(stream)
        reply = stub.Cancel(pb.CancelRequest(request_id=first.request_id))
        assert reply.cancelled and reply.status == pb.REQUEST_STATUS_CANCELLED
        rest = list(stream)
        assert rest[-1].complete.finish_reason == "cancelled"
        state = stub.GetRequest(pb.GetRequestRequest(request_id=first.request_id))
        assert state.status == pb.REQUEST_STATUS_CANCELLED and len(state.token_ids) < 400
        assert not stub.Cancel(pb.CancelRequest(request_id=first.request_id)).cancelled
        _wait_until(lambda: engine.block_manager.num_used_blocks == 0)


def test_a_passed_deadline_is_deadline_exceeded_and_the_request_stopped(engine, redis_store):
    with serving(_config(), embedded_backend(engine), redis_store) as (_, stub):
        with pytest.raises(grpc.RpcError) as err:
            _drain(stub.Generate(_prompt(max_tokens=400, ignore_eos=True), timeout=0.5))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.requests)


def test_a_client_that_goes_away_gets_its_request_cancelled(engine, redis_store):
    with serving(_config(detach_grace_s=0.2), embedded_backend(engine), redis_store) as (server, stub):
        stream = stub.Generate(_prompt(max_tokens=400, ignore_eos=True))
        rid = next(stream).request_id
        stream.cancel()
        _wait_until(lambda: stub.GetRequest(pb.GetRequestRequest(request_id=rid)).status
                    == pb.REQUEST_STATUS_CANCELLED)
        _wait_until(lambda: engine.block_manager.num_used_blocks == 0)


def test_a_retry_with_the_same_client_request_id_attaches_to_the_first_request(engine, redis_store):
    with serving(_config(), embedded_backend(engine), redis_store) as (_, stub):
        request = _prompt(max_tokens=12, ignore_eos=True)
        request.client_request_id = "retry-me"
        first_tokens, first = _drain(stub.Generate(request))
        again_tokens, again = _drain(stub.Generate(request))
        assert again[0].request_id == first[0].request_id and again_tokens == first_tokens
        assert again[-1].complete.finish_reason == "length"


def test_resume_continues_from_the_index_the_client_has(engine, redis_store):
    with serving(_config(), embedded_backend(engine), redis_store) as (_, stub):
        stream = stub.Generate(_prompt(max_tokens=40, ignore_eos=True))
        seen: list[int] = []
        for message in stream:
            seen += message.chunk.token_ids
            if len(seen) >= 5:
                break
        rid = message.request_id
        stream.cancel()  # the connection is lost; within the grace time the client comes back
        rest, messages = _drain(stub.Resume(pb.ResumeRequest(request_id=rid, from_index=len(seen)), timeout=60))
        assert messages[-1].complete.finish_reason == "length"
        full = list(stub.GetRequest(pb.GetRequestRequest(request_id=rid)).token_ids)
        assert seen + rest == full and len(full) == 40
        # After the end, Resume replays from the store.
        replay, _ = _drain(stub.Resume(pb.ResumeRequest(request_id=rid, from_index=7)))
        assert replay == full[7:]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Resume(pb.ResumeRequest(request_id="no-such-request")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_full_replica_answers_resource_exhausted(engine):
    one = AdmissionConfig(max_running_requests=1, max_queued_requests=0)
    with serving(_config(one), embedded_backend(engine)) as (_, stub):
        running = stub.Generate(_prompt(max_tokens=400, ignore_eos=True))
        rid = next(running).request_id
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_prompt(max_tokens=4)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queued" in err.value.details()
        stub.Cancel(pb.CancelRequest(request_id=rid))
        list(running)
        tokens, _ = _drain(stub.Generate(_prompt(max_tokens=4)))  # room again
        assert tokens


def test_a_request_larger_than_the_kv_budget_is_refused(engine):
    budget = engine.block_manager.num_blocks * engine.config.block_size
    with serving(_config(AdmissionConfig(kv_overcommit=100 / budget)), embedded_backend(engine)) as (_, stub):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_prompt(max_tokens=200)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV" in err.value.details()
        assert len(_drain(stub.Generate(_prompt(max_tokens=50)))[0]) == 50  # 54 tokens fit in 100


def test_queued_requests_are_admitted_by_priority_and_a_deadline_holds_in_the_queue(engine):
    import threading

    one = AdmissionConfig(max_running_requests=1, max_queued_requests=8)
    with serving(_config(one), embedded_backend(engine)) as (server, stub):
        blocker = stub.Generate(_prompt(max_tokens=400, ignore_eos=True))
        blocker_id = next(blocker).request_id
        order: list[str] = []

        def run(name: str, priority: int) -> None:
            request = _prompt(max_tokens=3)
            request.priority = priority
            _drain(stub.Generate(request))
            order.append(name)

        threads = [threading.Thread(target=run, args=(name, p)) for name, p in (("low", 0), ("high", 5), ("mid", 2))]
        for t in threads:
            t.start()
            _wait_until(lambda n=len(order) + threads.index(t) + 1: server.server.manager.waiting == n)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(_prompt(max_tokens=3), timeout=0.3))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stub.Cancel(pb.CancelRequest(request_id=blocker_id))
        list(blocker)
        for t in threads:
            t.join(30)
        assert order == ["high", "mid", "low"]
        assert server.server.manager.waiting == 0 and server.server.manager.admission.running == 0


def test_prometheus_metrics_count_what_the_clients_saw(engine):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    config = _config()
    config.metrics_port = 0
    config.metrics_interval_s = 0.05
    with serving(config, embedded_backend(engine)) as (server, stub):
        tokens, _ = _drain(stub.Generate(_prompt(max_tokens=16, ignore_eos=True)))
        with pytest.raises(grpc.RpcError):
            list(stub.Generate(_prompt(top_p=0.0)))
        time.sleep(0.2)  # a worker-state refresh after the request
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    model = (("model", engine.loaded.name),)
    assert samples[("tandem_time_to_first_token_seconds_count", model)] == 1
    assert samples[("tandem_e2e_request_latency_seconds_count", model)] == 1
    assert samples[("tandem_generation_tokens_total", model)] == len(tokens) == 16
    assert samples[("tandem_prompt_tokens_total", model)] == 4
    assert samples[("tandem_request_success_total", (("finished_reason", "length"), *model))] == 1
    assert samples[("tandem_requests_rejected_total", (("code", "INVALID_ARGUMENT"), *model))] == 1
    assert samples[("tandem_num_requests_running", model)] == 0
    worker = (("model", engine.loaded.name), ("stage", "colocated"), ("worker", "embedded"))
    assert samples[("tandem_kv_cache_usage_perc", worker)] == 0.0
    spec = (("drafter", "ngram"), *model)
    steps = samples[("tandem_decode_steps_total", spec)]
    assert steps > 0 and samples[("tandem_decode_tokens_total", spec)] == 15  # the first token is the prefill's
    assert samples[("tandem_spec_decode_mean_accepted_tokens", spec)] == pytest.approx(15 / steps)
    # One request alone: every step after the prefill decoded it, and each ran a forward and drafted.
    assert samples[("tandem_engine_steps_total", spec)] == steps + 1
    assert samples[("tandem_forward_seconds_total", spec)] > samples[("tandem_draft_seconds_total", spec)] > 0


def test_bench_serve_writes_every_field_the_issue_names(smollm2_dir, tmp_path):
    """`tandem bench serve` (the command, in process) against a live server (a tiny model with
    the real vocabulary, so HumanEval's text tokenizes): every mode at every rate, in two rounds
    pooled, ratios of auto against off, and the seed it was given."""
    from typer.testing import CliRunner

    from orchestrator.cli import app
    from tests.conftest import make_tiny_hf_dir

    model_dir = make_tiny_hf_dir(tmp_path / "tiny", smollm2_dir, vocab_size=49152, num_hidden_layers=2)
    engine = LLMEngine(EngineConfig(model=str(model_dir), speculation=SpecConfig(drafter="ngram")))
    out = tmp_path / "serve.json"
    with serving(_config(), embedded_backend(engine)) as (server, _):
        result = CliRunner().invoke(app, ["bench", "serve", "--server", server.address, "--rates", "2,4",
                                          "--duration", "1", "--max-new-tokens", "8", "--seed", "7", "--rounds", "2",
                                          "--json", str(out), "--plot", str(tmp_path / "serve.png")])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["config"]["seed"] == 7 and (tmp_path / "serve.png").stat().st_size > 0
    for rate in ("2.0", "4.0"):
        assert set(saved["rates"][rate]) == {"off", "fixed", "auto"}
        for row in saved["rates"][rate].values():
            assert row["completed"] == row["requests"] > 0 and not row["errors"]
            for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "itl_p50_s", "itl_p99_s"):
                assert row[key] > 0
            assert row["goodput_rps"] >= 0 and 0 <= row["slo_attained"] <= 1
            steps = row["server_steps"]
            assert steps["steps"] > 0 and steps["requests_per_step"] > 0 and steps["forward_ms_per_step"] > 0
            rounds = row["rounds"]
            assert [r["round"] for r in rounds] == [0, 1]
            assert row["requests"] == sum(r["requests"] for r in rounds)  # pooled, not the last round's
            assert steps["steps"] == sum(r["server_steps"]["steps"] for r in rounds)
        assert saved["rates"][rate]["off"]["server_steps"]["drafted_share"] == 0  # "none" never drafts
        assert saved["rates"][rate]["fixed"]["server_steps"]["drafted_share"] > 0
    assert set(saved["auto_vs_off"]) == {"lowest_rate", "highest_rate"}
    assert len(saved["auto_vs_off"]["highest_rate"]["auto_tpot_p50_vs_off_per_round"]) == 2
    assert saved["server"]["drafter"] == "ngram" and saved["prompts_repeated"] is False
