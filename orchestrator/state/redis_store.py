"""The Redis store, shared by orchestrator replicas.

Keys (prefix P, default "tandem"):
  P:req:<id>          hash: `data` (the record as created, JSON) plus the mutable fields that override it
                      (status, updated_at, finish_reason, error, usage as JSON) and `idem` (its key's name)
  P:tok:<id>          list of generated token ids
  P:idem:<key>        request id holding an idempotency key
  P:unfinished        set of non-terminal request ids
  P:lease:<role>:<id> lease owner, expiring with PX
Every read-check-write is one Lua script, so replicas never interleave inside one. Lua only compares
and copies strings (no cjson: it rounds numbers), and the transition table is passed in from Python.
Scripts reference keys they build from the prefix, so this works on a single Redis, not on Cluster.
Each command is sent at most once (no client retries): after an outage the caller sees
StateStoreUnavailable rather than, say, a re-sent create that reports its own record as a duplicate.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.state.store import (
    TERMINAL,
    InvalidTransition,
    RequestExists,
    RequestRecord,
    RequestStatus,
    StateStore,
    StateStoreUnavailable,
    TokenConflict,
    UnknownRequest,
    allowed_sources,
    as_token_ids,
    check_lease_args,
)

# KEYS: rec, tok, unfinished[, idem]. ARGV: id, data, status, updated_at, terminal, retention_ms, rec-key prefix.
_CREATE = """
local idem = KEYS[4]
if idem then
  local other = redis.call('GET', idem)
  if other then
    local h = redis.call('HGETALL', ARGV[7] .. other)
    if #h > 0 then return {'dup', h} end
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'status', ARGV[3], 'updated_at', ARGV[4])
if idem then
  redis.call('SET', idem, ARGV[1])
  redis.call('HSET', KEYS[1], 'idem', idem)
end
if ARGV[5] == '1' then
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  if idem then redis.call('PEXPIRE', idem, ARGV[6]) end
else
  redis.call('SADD', KEYS[3], ARGV[1])
end
return {'ok'}
"""

# KEYS: rec, tok, unfinished. ARGV: id, allowed sources (comma-separated), terminal, retention_ms, field/value...
_SET_STATUS = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {'unknown'} end
local allowed = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == cur then allowed = true end
end
if not allowed then return {'invalid', cur} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
if ARGV[3] == '1' then
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  local idem = redis.call('HGET', KEYS[1], 'idem')
  if idem then redis.call('PEXPIRE', idem, ARGV[4]) end
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# KEYS: rec, tok. ARGV: start, terminal statuses (comma-separated), token ids...
_APPEND = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'unknown'} end
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == status then return {'terminal', status} end
end
local n = redis.call('LLEN', KEYS[2])
local start = tonumber(ARGV[1])
local k = #ARGV - 2
if start == n then
  for i = 3, #ARGV, 1000 do  -- chunks: unpack() is limited by Lua's C stack
    n = redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  return {'ok', n}
end
if start < 0 or start > n or start + k > n then return {'conflict', n} end
if k > 0 then
  local stored = redis.call('LRANGE', KEYS[2], start, start + k - 1)
  for i = 1, k do
    if stored[i] ~= ARGV[i + 2] then return {'conflict', n} end
  end
end
return {'ok', n}
"""

# KEYS: rec, tok, unfinished. ARGV: id.
_DELETE = """
local idem = redis.call('HGET', KEYS[1], 'idem')
if idem and redis.call('GET', idem) == ARGV[1] then redis.call('DEL', idem) end
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[2])
return redis.call('DEL', KEYS[1])
"""

# KEYS: lease. ARGV: owner, ttl_ms. Free (or expired: PX removed it) or ours -> (re)set.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

_TERMINAL_ARG = ",".join(sorted(s.value for s in TERMINAL))
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)  # BusyLoading is a ConnectionError


def _record(flat: list[str]) -> RequestRecord:
    """A record from a flat HGETALL reply (as Lua returns it): `data`, overridden by the mutable fields."""
    h = dict(zip(flat[::2], flat[1::2]))
    d: dict[str, Any] = json.loads(h["data"])
    d["status"] = h["status"]
    d["updated_at"] = float(h["updated_at"])
    for name in ("finish_reason", "error"):
        if name in h:
            d[name] = h[name]
    if "usage" in h:
        d["usage"] = json.loads(h["usage"])
    return RequestRecord.from_dict(d)


class RedisStateStore(StateStore):
    def __init__(self, client: aioredis.Redis, *, prefix: str = "tandem", retention_s: float = 3600.0,
                 owns_client: bool = False) -> None:
        super().__init__(retention_s)
        if not prefix:
            raise ValueError("the key prefix must not be empty")
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the Redis client must be created with decode_responses=True")
        self.client, self.prefix, self._owns_client = client, prefix, owns_client
        self._retention_ms = max(1, round(retention_s * 1000))
        register = client.register_script  # once: evalsha afterwards, re-loaded by redis-py after a restart
        self._create, self._set_status, self._append = register(_CREATE), register(_SET_STATUS), register(_APPEND)
        self._delete, self._acquire = register(_DELETE), register(_ACQUIRE)
        self._renew, self._release = register(_RENEW), register(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "tandem", retention_s: float = 3600.0,
                 **redis_kw: Any) -> RedisStateStore:
        """A store on its own client; nothing connects until the first command."""
        redis_kw.setdefault("socket_connect_timeout", 2.0)
        redis_kw.setdefault("socket_timeout", 5.0)  # a hung Redis surfaces as unavailable, not as a hang
        redis_kw.setdefault("retry", Retry(NoBackoff(), 0))
        redis_kw["decode_responses"] = True
        client = aioredis.Redis.from_url(url, **redis_kw)
        return cls(client, prefix=prefix, retention_s=retention_s, owns_client=True)

    def __repr__(self) -> str:  # never the URL: it may hold a password
        kw = self.client.get_connection_kwargs()
        return f"RedisStateStore({kw.get('host')}:{kw.get('port')}/{kw.get('db')}, prefix={self.prefix!r})"

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE as e:
            raise StateStoreUnavailable(f"{self!r}: {e}") from e

    def _req(self, rid: str) -> str:
        return f"{self.prefix}:req:{rid}"

    def _tok(self, rid: str) -> str:
        return f"{self.prefix}:tok:{rid}"

    def _lease(self, rid: str, role: str) -> str:
        return f"{self.prefix}:lease:{role}:{rid}"

    @property
    def _unfinished(self) -> str:
        return f"{self.prefix}:unfinished"

    # -- records -------------------------------------------------------------------------------

    async def create(self, record: RequestRecord) -> tuple[RequestRecord, bool]:
        rid, key = record.request_id, record.idempotency_key
        keys = [self._req(rid), self._tok(rid), self._unfinished]
        if key is not None:
            keys.append(f"{self.prefix}:idem:{key}")
        args = [rid, record.to_json(), record.status.value, repr(float(record.updated_at)),
                int(record.status.terminal), self._retention_ms, f"{self.prefix}:req:"]
        with self._guard():
            reply = await self._create(keys=keys, args=args)
        if reply[0] == "dup":
            return _record(reply[1]), False
        if reply[0] == "exists":
            raise RequestExists(f"request {rid!r} exists")
        return RequestRecord.from_json(record.to_json()), True

    async def get(self, request_id: str) -> RequestRecord | None:
        with self._guard():
            h = await self.client.hgetall(self._req(request_id))
        return _record([x for kv in h.items() for x in kv]) if h else None

    async def set_status(self, request_id: str, status: RequestStatus, *, finish_reason: str | None = None,
                         error: str | None = None, usage: dict[str, int] | None = None) -> RequestRecord:
        status = RequestStatus(status)
        fields: list[Any] = ["status", status.value, "updated_at", repr(time.time())]
        if finish_reason is not None:
            fields += ["finish_reason", finish_reason]
        if error is not None:
            fields += ["error", error]
        if usage is not None:
            fields += ["usage", json.dumps({k: int(v) for k, v in usage.items()})]
        sources = ",".join(sorted(s.value for s in allowed_sources(status)))
        keys = [self._req(request_id), self._tok(request_id), self._unfinished]
        with self._guard():
            reply = await self._set_status(
                keys=keys, args=[request_id, sources, int(status.terminal), self._retention_ms, *fields])
        if reply[0] == "unknown":
            raise UnknownRequest(f"unknown request {request_id!r}")
        if reply[0] == "invalid":
            raise InvalidTransition(request_id, reply[1], status)
        return _record(reply[1])

    async def unfinished(self) -> list[str]:
        with self._guard():
            return sorted(await self.client.smembers(self._unfinished))

    async def delete(self, request_id: str) -> bool:
        keys = [self._req(request_id), self._tok(request_id), self._unfinished]
        with self._guard():
            return bool(await self._delete(keys=keys, args=[request_id]))

    # -- tokens --------------------------------------------------------------------------------

    async def append_tokens(self, request_id: str, start: int, token_ids: Sequence[int]) -> int:
        new = as_token_ids(token_ids)
        with self._guard():
            reply = await self._append(keys=[self._req(request_id), self._tok(request_id)],
                                       args=[int(start), _TERMINAL_ARG, *new])
        if reply[0] == "unknown":
            raise UnknownRequest(f"unknown request {request_id!r}")
        if reply[0] == "terminal":
            raise InvalidTransition(request_id, reply[1], None)
        if reply[0] == "conflict":
            raise TokenConflict(request_id, int(reply[1]), start)
        return int(reply[1])

    async def _checked(self, request_id: str, command: str, *args: Any) -> Any:
        """A token-list command, with the record's existence read in the same transaction."""
        with self._guard():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.exists(self._req(request_id))
                getattr(pipe, command)(self._tok(request_id), *args)
                exists, result = await pipe.execute()
        if not exists:
            raise UnknownRequest(f"unknown request {request_id!r}")
        return result

    async def tokens(self, request_id: str, start: int = 0, end: int | None = None) -> list[int]:
        if end == 0:  # Python's [s:0] is empty; LRANGE s -1 would be everything
            await self._checked(request_id, "llen")
            return []
        stop = -1 if end is None else end - 1  # LRANGE's stop is inclusive; negatives agree with Python's
        return [int(t) for t in await self._checked(request_id, "lrange", start, stop)]

    async def num_tokens(self, request_id: str) -> int:
        return int(await self._checked(request_id, "llen"))

    # -- leases --------------------------------------------------------------------------------

    async def acquire_lease(self, request_id: str, role: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = check_lease_args(role, ttl_s)
        with self._guard():
            return bool(await self._acquire(keys=[self._lease(request_id, role)], args=[owner, ttl_ms]))

    async def renew_lease(self, request_id: str, role: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = check_lease_args(role, ttl_s)
        with self._guard():
            return bool(await self._renew(keys=[self._lease(request_id, role)], args=[owner, ttl_ms]))

    async def release_lease(self, request_id: str, role: str, owner: str) -> bool:
        check_lease_args(role)
        with self._guard():
            return bool(await self._release(keys=[self._lease(request_id, role)], args=[owner]))

    async def lease_owner(self, request_id: str, role: str) -> str | None:
        check_lease_args(role)
        with self._guard():
            return await self.client.get(self._lease(request_id, role))

    # -- connection ----------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()
