"""The embedded in-memory store: one process, no dependencies, the default.

No method awaits between reading and writing state, so each is atomic under asyncio (not across threads).
Records are copied through JSON on the way in and out, so callers never alias stored state and
non-JSON parameters fail here as they do in Redis.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Sequence

from orchestrator.state.store import (
    TRANSITIONS,
    InvalidTransition,
    RequestExists,
    RequestRecord,
    RequestStatus,
    StateStore,
    TokenConflict,
    UnknownRequest,
    as_token_ids,
    check_lease_args,
)


def _copy(record: RequestRecord) -> RequestRecord:
    return RequestRecord.from_json(record.to_json())


class MemoryStateStore(StateStore):
    def __init__(self, retention_s: float = 3600.0) -> None:
        super().__init__(retention_s)
        self._records: dict[str, RequestRecord] = {}
        self._tokens: dict[str, list[int]] = {}
        self._idempotency: dict[str, str] = {}  # key -> request id
        self._expires: dict[str, float] = {}  # terminal request id -> monotonic deadline
        self._expiry_queue: deque[tuple[float, str]] = deque()  # deadlines in order: retention is constant
        self._leases: dict[tuple[str, str], tuple[str, float]] = {}  # (request id, role) -> (owner, deadline)
        self._lease_heap: list[tuple[float, str, str]] = []  # lazily validated deadlines, to drop stale leases

    def __repr__(self) -> str:
        return f"MemoryStateStore(records={len(self._records)}, retention_s={self.retention_s})"

    # -- housekeeping --------------------------------------------------------------------------

    def _purge(self) -> None:
        now = time.monotonic()
        while self._expiry_queue and self._expiry_queue[0][0] <= now:
            deadline, rid = self._expiry_queue.popleft()
            if self._expires.get(rid) == deadline:
                self._drop(rid)
        while self._lease_heap and self._lease_heap[0][0] <= now:
            deadline, rid, role = heapq.heappop(self._lease_heap)
            held = self._leases.get((rid, role))
            if held is not None and held[1] <= now:
                del self._leases[(rid, role)]

    def _drop(self, rid: str) -> bool:
        record = self._records.pop(rid, None)
        self._tokens.pop(rid, None)
        self._expires.pop(rid, None)
        if record is not None and record.idempotency_key is not None:
            if self._idempotency.get(record.idempotency_key) == rid:
                del self._idempotency[record.idempotency_key]
        return record is not None

    def _retire(self, rid: str) -> None:
        deadline = time.monotonic() + self.retention_s
        self._expires[rid] = deadline
        self._expiry_queue.append((deadline, rid))

    def _live(self, rid: str) -> RequestRecord:
        self._purge()
        record = self._records.get(rid)
        if record is None:
            raise UnknownRequest(f"unknown request {rid!r}")
        return record

    # -- records -------------------------------------------------------------------------------

    async def create(self, record: RequestRecord) -> tuple[RequestRecord, bool]:
        stored = _copy(record)
        self._purge()
        key = stored.idempotency_key
        if key is not None and key in self._idempotency:
            return _copy(self._records[self._idempotency[key]]), False
        if stored.request_id in self._records:
            raise RequestExists(f"request {stored.request_id!r} exists")
        self._records[stored.request_id] = stored
        self._tokens[stored.request_id] = []
        if key is not None:
            self._idempotency[key] = stored.request_id
        if stored.status.terminal:
            self._retire(stored.request_id)
        return _copy(stored), True

    async def get(self, request_id: str) -> RequestRecord | None:
        self._purge()
        record = self._records.get(request_id)
        return None if record is None else _copy(record)

    async def set_status(self, request_id: str, status: RequestStatus, *, finish_reason: str | None = None,
                         error: str | None = None, usage: dict[str, int] | None = None) -> RequestRecord:
        status = RequestStatus(status)
        record = self._live(request_id)
        if status not in TRANSITIONS[record.status]:
            raise InvalidTransition(request_id, record.status, status)
        record.status, record.updated_at = status, time.time()
        if finish_reason is not None:
            record.finish_reason = finish_reason
        if error is not None:
            record.error = error
        if usage is not None:
            record.usage = {k: int(v) for k, v in usage.items()}
        if status.terminal:
            self._retire(request_id)
        return _copy(record)

    async def unfinished(self) -> list[str]:
        self._purge()
        return sorted(rid for rid, r in self._records.items() if not r.status.terminal)

    async def delete(self, request_id: str) -> bool:
        self._purge()
        return self._drop(request_id)

    # -- tokens --------------------------------------------------------------------------------

    async def append_tokens(self, request_id: str, start: int, token_ids: Sequence[int]) -> int:
        new = as_token_ids(token_ids)
        record = self._live(request_id)
        if record.status.terminal:
            raise InvalidTransition(request_id, record.status, None)
        stored = self._tokens[request_id]
        if start == len(stored):
            stored.extend(new)
        elif not (0 <= start and start + len(new) <= len(stored) and stored[start:start + len(new)] == new):
            raise TokenConflict(request_id, len(stored), start)
        return len(stored)

    async def tokens(self, request_id: str, start: int = 0, end: int | None = None) -> list[int]:
        self._live(request_id)
        return self._tokens[request_id][start:end]

    async def num_tokens(self, request_id: str) -> int:
        self._live(request_id)
        return len(self._tokens[request_id])

    # -- leases --------------------------------------------------------------------------------

    def _holder(self, request_id: str, role: str) -> str | None:
        self._purge()
        held = self._leases.get((request_id, role))
        return held[0] if held is not None and held[1] > time.monotonic() else None

    def _grant(self, request_id: str, role: str, owner: str, ttl_ms: int) -> None:
        deadline = time.monotonic() + ttl_ms / 1000
        self._leases[(request_id, role)] = (owner, deadline)
        heapq.heappush(self._lease_heap, (deadline, request_id, role))

    async def acquire_lease(self, request_id: str, role: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = check_lease_args(role, ttl_s)
        if self._holder(request_id, role) not in (None, owner):
            return False
        self._grant(request_id, role, owner, ttl_ms)
        return True

    async def renew_lease(self, request_id: str, role: str, owner: str, ttl_s: float) -> bool:
        ttl_ms = check_lease_args(role, ttl_s)
        if self._holder(request_id, role) != owner:
            return False
        self._grant(request_id, role, owner, ttl_ms)
        return True

    async def release_lease(self, request_id: str, role: str, owner: str) -> bool:
        check_lease_args(role)
        if self._holder(request_id, role) != owner:
            return False
        del self._leases[(request_id, role)]
        return True

    async def lease_owner(self, request_id: str, role: str) -> str | None:
        check_lease_args(role)
        return self._holder(request_id, role)

    async def ping(self) -> bool:
        return True
