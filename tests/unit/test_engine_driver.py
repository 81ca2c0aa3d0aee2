"""The engine driver: a step loop on its own thread, outputs delivered to the event loop in order."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.engine_driver import EngineDriver
from services.runtime.engine import EngineConfig, LLMEngine
from services.runtime.errors import InvalidRequestError
from services.runtime.sampling_params import SamplingParams
from tests.conftest import assert_no_leaks


def test_outputs_arrive_in_order_bad_input_raises_and_a_failed_step_fails_only_its_requests(tiny):
    engine = LLMEngine(EngineConfig(model=str(tiny.hf_dir)), loaded=tiny)
    real_step, broken = engine.step, {"once": False}

    def step():  # fault injection: one step raises, as a bug in it would
        if broken["once"]:
            broken["once"] = False
            raise RuntimeError("boom")
        return real_step()

    engine.step = step
    driver = EngineDriver(engine)

    async def body():
        async def run(rid: str) -> list:
            outs: asyncio.Queue = asyncio.Queue()
            await driver.add(rid, [5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True), outs.put_nowait)
            got = [await outs.get()]
            while not got[-1].finished:
                got.append(await outs.get())
            return got

        ok = await run("a")
        assert [len(o.token_ids) for o in ok] == list(range(1, 7)) and ok[-1].finish_reason == "length"
        with pytest.raises(InvalidRequestError):
            await driver.add("bad", [10**9], SamplingParams(), lambda out: None)
        broken["once"] = True
        failed = await run("b")
        assert failed[-1].finish_reason == "error" and "failed" in failed[-1].error
        again = await run("c")  # the driver thread survived
        assert again[-1].finish_reason == "length"

    try:
        asyncio.run(body())
    finally:
        driver.stop()
    assert_no_leaks(engine)


def test_build_makes_the_engine_on_the_thread_that_steps_it(tiny):
    """The model loads on the driver thread (one OpenMP team for loading and stepping); a
    failed build is reported to the caller and leaves the driver without a loop to step."""
    import threading

    made_on, stepped_on = [], set()

    def make() -> LLMEngine:
        made_on.append(threading.current_thread())
        engine = LLMEngine(EngineConfig(model=str(tiny.hf_dir)), loaded=tiny)
        real_step = engine.step
        engine.step = lambda: (stepped_on.add(threading.current_thread()), real_step())[1]
        return engine

    def broken() -> LLMEngine:
        raise FileNotFoundError("no such model")

    async def body(driver: EngineDriver) -> None:
        with pytest.raises(FileNotFoundError, match="no such model"):
            await driver.build(broken, lambda e: e)
        assert driver.loop is None
        engine = await driver.build(make, lambda e: e)
        assert driver.loop is engine
        outs: asyncio.Queue = asyncio.Queue()
        await driver.add("a", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True), outs.put_nowait)
        while not (await outs.get()).finished:
            pass
        with pytest.raises(RuntimeError, match="already drives"):
            await driver.build(make, lambda e: e)

    driver = EngineDriver()
    try:
        asyncio.run(body(driver))
    finally:
        driver.stop()
    assert made_on == [driver._thread] and stepped_on == {driver._thread}
    assert_no_leaks(driver.loop)
