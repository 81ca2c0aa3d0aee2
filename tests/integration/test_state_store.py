"""One contract for both request-state stores: in memory, and Redis (a real redis-server).

Each Redis test gets its own key prefix and deletes its keys afterwards, so tests never see each
other's data nor a developer's on 6379. Tests are sync functions around `asyncio.run`: one event
loop per test, which is also what a redis.asyncio client (bound to its loop) needs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio.connection import SSLConnection

from orchestrator.state import (
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    MemoryStateStore,
    RedisStateStore,
    RequestExists,
    RequestRecord,
    RequestStatus,
    StateStore,
    StateStoreUnavailable,
    TokenConflict,
    UnknownRequest,
    open_store,
)
from tests.redis_server import RedisServer, drop_keys, free_port, redis_binary

S = RequestStatus
Body = Callable[[StateStore], Awaitable[None]]


@dataclass
class Backend:
    name: str
    url: str | None = None
    prefix: str = ""

    def open(self, **kw: Any) -> StateStore:
        if self.name == "memory":
            return MemoryStateStore(**kw)
        return RedisStateStore.from_url(self.url, prefix=self.prefix, **kw)

    def run(self, body: Body, **kw: Any) -> None:
        """Run `body` on a fresh store inside a fresh event loop, closing the store afterwards."""

        async def main() -> None:
            store = self.open(**kw)
            try:
                await body(store)
            finally:
                await store.close()

        asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        yield Backend("memory")
        return
    url = request.getfixturevalue("redis_url")  # only the Redis variant needs (or skips without) a server
    b = Backend("redis", url, f"tandem-test-{uuid.uuid4().hex}")
    yield b
    drop_keys(url, b.prefix)


def rec(rid: str | None = None, **kw: Any) -> RequestRecord:
    kw.setdefault("params", {"max_tokens": 16, "temperature": 0.0})
    return RequestRecord(request_id=rid or uuid.uuid4().hex, model="m", prompt_token_ids=[1, 2, 3], seed=7, **kw)


async def reach(store: StateStore, status: RequestStatus) -> str:
    """A new request moved to `status` along allowed transitions; returns its id."""
    r, _ = await store.create(rec())
    if status is S.QUEUED:
        return r.request_id
    if status is not S.RUNNING:
        await store.set_status(r.request_id, S.RUNNING)
    await store.set_status(r.request_id, status)
    return r.request_id


# -- records ------------------------------------------------------------------------------------

def test_create_get_round_trip_every_field(backend: Backend) -> None:
    record = RequestRecord(
        request_id="req-ü-1", model="org/model:rev", prompt_token_ids=[0, 5, 151_000, 2**31 - 1],
        seed=2**63 - 1,
        params={"max_tokens": 64, "temperature": 0.7, "top_p": 0.95, "stop": ["\n\n", "ünïcode"], "drafter": None,
                "nested": {"a": [1, 2.5, True]}},
        status=S.RUNNING, finish_reason="length", error="boom", idempotency_key="idem-1", priority=-3,
        created_at=1_700_000_000.1234567, updated_at=1_700_000_001.7654321, usage={"accepted_draft_tokens": 12},
    )

    async def body(store: StateStore) -> None:
        assert await store.get(record.request_id) is None
        stored, created = await store.create(record)
        assert created and stored == record
        assert await store.get(record.request_id) == record
        assert await store.num_tokens(record.request_id) == 0

    backend.run(body)


def test_records_are_copies(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        r = rec(params={"stop": ["x"]})
        stored, _ = await store.create(r)
        r.params["stop"].append("y")
        stored.params["temperature"] = 9.0
        got = await store.get(r.request_id)
        got.prompt_token_ids.append(99)
        assert (await store.get(r.request_id)).params == {"stop": ["x"]}
        assert (await store.get(r.request_id)).prompt_token_ids == [1, 2, 3]

    backend.run(body)


def test_non_json_params_are_refused(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        r = rec(params={"stop": {1, 2}})
        with pytest.raises(TypeError):
            await store.create(r)
        assert await store.get(r.request_id) is None

    backend.run(body)


def test_idempotency_key_returns_first_record(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        first, created = await store.create(rec("a", idempotency_key="k"))
        assert created
        again, created = await store.create(rec("b", idempotency_key="k", params={"max_tokens": 1}))
        assert not created and again == first
        assert await store.get("b") is None
        assert (await store.create(rec("c", idempotency_key="other")))[1]

    backend.run(body)


def test_concurrent_creates_with_one_key_create_exactly_one(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        results = await asyncio.gather(*(store.create(rec(f"r{i}", idempotency_key="same")) for i in range(20)))
        winners = [r for r, created in results if created]
        assert len(winners) == 1
        assert {r.request_id for r, _ in results} == {winners[0].request_id}
        assert [i for i in range(20) if await store.get(f"r{i}") is not None] == [int(winners[0].request_id[1:])]
        assert await store.unfinished() == [winners[0].request_id]

    backend.run(body)


def test_duplicate_request_id_raises(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create(rec("dup"))
        with pytest.raises(RequestExists):
            await store.create(rec("dup", params={"max_tokens": 1}))
        assert (await store.get("dup")).params == rec().params

    backend.run(body)


def test_delete_forgets_record_tokens_and_key(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        await store.create(rec("d", idempotency_key="kd"))
        await store.append_tokens("d", 0, [1, 2])
        assert await store.delete("d")
        assert await store.get("d") is None and await store.unfinished() == []
        with pytest.raises(UnknownRequest):
            await store.num_tokens("d")
        assert (await store.create(rec("d2", idempotency_key="kd")))[1]
        assert not await store.delete("never")

    backend.run(body)


# -- status -------------------------------------------------------------------------------------

ALLOWED = [(a, b) for a, targets in TRANSITIONS.items() for b in sorted(targets)]
FORBIDDEN = [(S.QUEUED, S.QUEUED), (S.QUEUED, S.FINISHED), (S.RUNNING, S.RUNNING), (S.FINISHED, S.RUNNING),
             (S.FAILED, S.QUEUED), (S.CANCELLED, S.FINISHED), (S.FINISHED, S.FINISHED)]


@pytest.mark.parametrize(("src", "dst"), ALLOWED, ids=lambda s: s.value)
def test_allowed_transition(backend: Backend, src: RequestStatus, dst: RequestStatus) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, src)
        before = (await store.get(rid)).updated_at
        after = await store.set_status(rid, dst)
        assert after.status is dst and after.updated_at >= before
        assert await store.get(rid) == after
        assert (rid in await store.unfinished()) is (dst not in TERMINAL)

    backend.run(body)


@pytest.mark.parametrize(("src", "dst"), FORBIDDEN, ids=lambda s: s.value)
def test_forbidden_transition(backend: Backend, src: RequestStatus, dst: RequestStatus) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, src)
        with pytest.raises(InvalidTransition, match=f"{src.value} -> {dst.value}"):
            await store.set_status(rid, dst)
        assert (await store.get(rid)).status is src

    backend.run(body)


@pytest.mark.parametrize("terminal", sorted(TERMINAL), ids=lambda s: s.value)
def test_terminal_is_final(backend: Backend, terminal: RequestStatus) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, terminal)
        for target in S:
            with pytest.raises(InvalidTransition):
                await store.set_status(rid, target)
        assert (await store.get(rid)).status is terminal

    backend.run(body)


def test_set_status_writes_final_fields(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        done = await store.set_status(rid, S.FINISHED, finish_reason="stop", usage={"accepted_draft_tokens": 5})
        assert (done.finish_reason, done.error, done.usage) == ("stop", None, {"accepted_draft_tokens": 5})
        assert await store.get(rid) == done
        rid = await reach(store, S.QUEUED)
        failed = await store.set_status(rid, S.FAILED, error="worker lost twice")
        assert failed.error == "worker lost twice" and await store.get(rid) == failed

    backend.run(body)


def test_unknown_request(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        with pytest.raises(UnknownRequest) as e:
            await store.set_status("nope", S.RUNNING)
        assert isinstance(e.value, KeyError) and "nope" in str(e.value)
        for call in (store.append_tokens("nope", 0, [1]), store.tokens("nope"), store.num_tokens("nope")):
            with pytest.raises(UnknownRequest):
                await call

    backend.run(body)


def test_unfinished_lists_only_non_terminal(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        ids = {s: await reach(store, s) for s in S}
        assert await store.unfinished() == sorted([ids[S.QUEUED], ids[S.RUNNING]])
        await store.set_status(ids[S.RUNNING], S.QUEUED)  # re-dispatch keeps it unfinished
        await store.set_status(ids[S.QUEUED], S.RUNNING)
        await store.set_status(ids[S.QUEUED], S.FINISHED)
        assert await store.unfinished() == [ids[S.RUNNING]]

    backend.run(body)


# -- tokens -------------------------------------------------------------------------------------

def test_append_in_order(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        assert await store.append_tokens(rid, 0, [10, 11, 12]) == 3
        assert await store.append_tokens(rid, 3, [13]) == 4
        assert await store.append_tokens(rid, 4, []) == 4
        assert await store.tokens(rid) == [10, 11, 12, 13] and await store.num_tokens(rid) == 4

    backend.run(body)


def test_idempotent_re_append(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        await store.append_tokens(rid, 0, [10, 11, 12])
        for start, again in [(0, [10, 11, 12]), (1, [11, 12]), (1, [11]), (2, [])]:
            assert await store.append_tokens(rid, start, again) == 3
        assert await store.tokens(rid) == [10, 11, 12]

    backend.run(body)


@pytest.mark.parametrize(("start", "new"), [(1, [99]), (0, [10, 11, 99]), (2, [12, 13]), (4, [14]), (-1, [12])],
                         ids=["changed", "changed-tail", "overlap-past-end", "gap", "negative"])
def test_conflicting_append_raises(backend: Backend, start: int, new: list[int]) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        await store.append_tokens(rid, 0, [10, 11, 12])
        with pytest.raises(TokenConflict, match=rf"at {start}\b.*\b3 stored"):
            await store.append_tokens(rid, start, new)
        assert await store.tokens(rid) == [10, 11, 12]

    backend.run(body)


def test_append_after_finish_raises(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        await store.append_tokens(rid, 0, [1, 2])
        await store.set_status(rid, S.FINISHED, finish_reason="stop")
        for start, new in [(2, [3]), (0, [1, 2])]:  # a late retry too: the request has ended
            with pytest.raises(InvalidTransition, match="finished"):
                await store.append_tokens(rid, start, new)
        assert await store.tokens(rid) == [1, 2]

    backend.run(body)


def test_append_to_queued_request(backend: Backend) -> None:
    """A re-queued request keeps its tokens: the next worker resumes after them."""

    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        await store.append_tokens(rid, 0, [1, 2])
        await store.set_status(rid, S.QUEUED)
        assert await store.append_tokens(rid, 2, [3]) == 3

    backend.run(body)


SLICES = [(0, None), (2, None), (2, 5), (0, 0), (3, 3), (5, 2), (-3, None), (0, -1), (-4, -2), (8, 100), (0, 100),
          (-100, 2)]


def test_tokens_slicing(backend: Backend) -> None:
    data = list(range(100, 110))

    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        await store.append_tokens(rid, 0, data)
        for start, end in SLICES:
            assert await store.tokens(rid, start, end) == data[start:end], (start, end)

    backend.run(body)


def test_large_append(backend: Backend) -> None:
    data = list(range(20_000))  # beyond one Lua unpack()

    async def body(store: StateStore) -> None:
        rid = await reach(store, S.RUNNING)
        assert await store.append_tokens(rid, 0, data) == len(data)
        assert await store.append_tokens(rid, 0, data) == len(data)
        assert await store.tokens(rid, 19_990) == data[19_990:]

    backend.run(body)


# -- leases -------------------------------------------------------------------------------------

def test_lease_ownership(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.lease_owner("r", "orchestrator") is None
        assert await store.acquire_lease("r", "orchestrator", "A", 5)
        assert not await store.acquire_lease("r", "orchestrator", "B", 5)
        assert await store.acquire_lease("r", "orchestrator", "A", 5)  # ours: renews
        assert await store.renew_lease("r", "orchestrator", "A", 5)
        assert not await store.renew_lease("r", "orchestrator", "B", 5)
        assert not await store.release_lease("r", "orchestrator", "B")
        assert await store.lease_owner("r", "orchestrator") == "A"
        assert await store.acquire_lease("r", "worker", "W", 5)  # roles are independent
        assert await store.release_lease("r", "orchestrator", "A")
        assert await store.lease_owner("r", "orchestrator") is None
        assert not await store.release_lease("r", "orchestrator", "A")
        assert await store.acquire_lease("r", "orchestrator", "B", 5)
        assert await store.lease_owner("r", "worker") == "W"
        with pytest.raises(ValueError):
            await store.acquire_lease("r", "orchestrator", "A", 0)
        with pytest.raises(ValueError):
            await store.acquire_lease("r", "a:b", "A", 1)

    backend.run(body)


def test_lease_expiry(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        assert await store.acquire_lease("r", "orchestrator", "A", 0.2)
        assert await store.renew_lease("r", "orchestrator", "A", 0.2)
        await asyncio.sleep(0.3)
        assert await store.lease_owner("r", "orchestrator") is None
        assert not await store.renew_lease("r", "orchestrator", "A", 0.2)
        assert await store.acquire_lease("r", "orchestrator", "B", 5)
        assert await store.lease_owner("r", "orchestrator") == "B"

    backend.run(body)


# -- retention ----------------------------------------------------------------------------------

def test_terminal_records_expire_after_retention(backend: Backend) -> None:
    async def body(store: StateStore) -> None:
        done = await reach(store, S.RUNNING)
        await store.append_tokens(done, 0, [1, 2])
        await store.set_status(done, S.FINISHED)
        r, _ = await store.create(rec("keyed", idempotency_key="kr"))
        await store.set_status(r.request_id, S.CANCELLED)
        running = await reach(store, S.RUNNING)
        await store.append_tokens(running, 0, [5])
        await asyncio.sleep(1.0)
        assert await store.get(done) is None and await store.get("keyed") is None
        with pytest.raises(UnknownRequest):
            await store.tokens(done)
        assert (await store.get(running)).status is S.RUNNING and await store.tokens(running) == [5]
        assert await store.unfinished() == [running]
        assert (await store.create(rec("keyed-again", idempotency_key="kr")))[1]  # the key was released too

    backend.run(body, retention_s=0.5)


# -- factory and outages ------------------------------------------------------------------------

def test_open_store_dispatch() -> None:
    async def main() -> None:
        assert isinstance(open_store(None), MemoryStateStore)
        assert open_store("memory://", retention_s=5, prefix="px").retention_s == 5
        plain = open_store("redis://127.0.0.1:6390/2", prefix="px")
        kw = plain.client.get_connection_kwargs()
        assert isinstance(plain, RedisStateStore) and plain.prefix == "px"
        assert (kw["host"], kw["port"], kw["db"]) == ("127.0.0.1", 6390, 2)
        tls = open_store("rediss://:secret@cache.example:6380/0")  # parsed only: nothing connects
        kw = tls.client.get_connection_kwargs()
        assert isinstance(tls, RedisStateStore) and tls.prefix == "tandem"
        assert (kw["host"], kw["port"], kw["db"], kw["password"]) == ("cache.example", 6380, 0, "secret")
        assert tls.client.connection_pool.connection_class is SSLConnection
        assert "secret" not in repr(tls)
        for store in (plain, tls):
            await store.close()

    asyncio.run(main())
    with pytest.raises(ValueError, match="'postgres'") as e:
        open_store("postgres://user:pw@db/state")
    assert "pw" not in str(e.value)


def test_redis_down_is_unavailable_not_a_crash() -> None:
    async def main() -> None:
        store = RedisStateStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix=f"t-{uuid.uuid4().hex}")
        t0 = time.monotonic()
        assert await store.ping() is False
        with pytest.raises(StateStoreUnavailable):
            await store.get("r")
        with pytest.raises(StateStoreUnavailable):
            await store.create(rec())
        with pytest.raises(StateStoreUnavailable):
            await store.acquire_lease("r", "orchestrator", "A", 1)
        assert time.monotonic() - t0 < 3  # refused fast: no retry storm
        await store.close()

    asyncio.run(main())


@pytest.mark.skipif(redis_binary() is None, reason="redis-server is not on PATH (cannot restart a Redis we do not own)")
def test_redis_restart_with_nothing_on_disk() -> None:
    async def main(server: RedisServer) -> None:
        store = RedisStateStore.from_url(server.url, prefix="restart")
        await store.create(rec("before"))
        assert await store.ping()
        server.stop()
        assert not await store.ping()
        with pytest.raises(StateStoreUnavailable):
            await store.get("before")
        server.start()
        assert await store.ping()
        assert await store.get("before") is None  # came back empty
        await store.create(rec("after"))  # scripts are re-loaded into the new server
        assert (await store.set_status("after", S.RUNNING)).status is S.RUNNING
        assert await store.unfinished() == ["after"]
        await store.close()

    with RedisServer() as server:
        asyncio.run(main(server))
