"""The request-state store's interface, record type and errors (no I/O here).

The orchestrator keeps what it must not lose across its own restarts here: each request's
parameters and status, the tokens generated so far (append-only, so a re-dispatched request
resumes where it stopped) and leases that say which replica and which worker own a request.
"""

from __future__ import annotations

import json
import operator
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any


class RequestStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED})

# RUNNING -> QUEUED is the re-dispatch after a worker was lost; terminal states have no way out.
TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    RequestStatus.QUEUED: frozenset({RequestStatus.RUNNING, RequestStatus.FAILED, RequestStatus.CANCELLED}),
    RequestStatus.RUNNING: frozenset(
        {RequestStatus.QUEUED, RequestStatus.FINISHED, RequestStatus.FAILED, RequestStatus.CANCELLED}
    ),
    RequestStatus.FINISHED: frozenset(),
    RequestStatus.FAILED: frozenset(),
    RequestStatus.CANCELLED: frozenset(),
}


def allowed_sources(target: RequestStatus) -> frozenset[RequestStatus]:
    """The states from which `target` may be entered (the Redis script checks membership in these)."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


class StateStoreError(Exception):
    """Base of the store's own errors."""


class UnknownRequest(StateStoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown request"


class RequestExists(StateStoreError, ValueError):
    pass


class InvalidTransition(StateStoreError, ValueError):
    """A status change `TRANSITIONS` forbids, or (target None) tokens appended to a terminal request."""

    def __init__(self, request_id: str, current: RequestStatus | str, target: RequestStatus | str | None) -> None:
        self.request_id, self.current = request_id, RequestStatus(current)
        self.target = None if target is None else RequestStatus(target)
        if self.target is None:
            msg = f"request {request_id!r} is {self.current.value}: no tokens can be appended"
        else:
            msg = f"request {request_id!r}: invalid transition {self.current.value} -> {self.target.value}"
        super().__init__(msg)


class TokenConflict(StateStoreError, ValueError):
    def __init__(self, request_id: str, stored: int, start: int) -> None:
        self.request_id, self.stored, self.start = request_id, stored, start
        super().__init__(
            f"request {request_id!r}: tokens appended at {start} conflict with the {stored} stored "
            "(not the next position, nor an exact retry of stored tokens)"
        )


class StateStoreUnavailable(RuntimeError):
    """The backend cannot be reached (connection refused, timeout): an outage, not a bug."""


@dataclass
class RequestRecord:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    seed: int
    params: dict[str, Any]  # JSON-serialisable sampling parameters
    status: RequestStatus = RequestStatus.QUEUED
    finish_reason: str | None = None
    error: str | None = None
    idempotency_key: str | None = None
    priority: int = 0
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    usage: dict[str, int] = field(default_factory=dict)  # counters written with the final state

    def __post_init__(self) -> None:
        self.status = RequestStatus(self.status)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in fields(cls)}  # unknown keys are ignored: newer writers may add fields
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        # JSON, never pickle: records carry client input. Raises TypeError for non-JSON params.
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, s: str | bytes) -> RequestRecord:
        return cls.from_dict(json.loads(s))


class StateStore(ABC):
    """Request records, generated tokens and leases, shared by the orchestrator replicas.

    Terminal records (with their tokens and idempotency key) expire `retention_s` after they ended.
    Backend outages raise `StateStoreUnavailable`.
    """

    def __init__(self, retention_s: float = 3600.0) -> None:
        if retention_s <= 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        self.retention_s = retention_s

    @abstractmethod
    async def create(self, record: RequestRecord) -> tuple[RequestRecord, bool]:
        """Store a new record; with an idempotency key already in use, store nothing and return
        `(existing, False)`. Raises `RequestExists` for a request id already stored."""

    @abstractmethod
    async def get(self, request_id: str) -> RequestRecord | None: ...

    @abstractmethod
    async def set_status(self, request_id: str, status: RequestStatus, *, finish_reason: str | None = None,
                         error: str | None = None, usage: dict[str, int] | None = None) -> RequestRecord:
        """Move to `status` if `TRANSITIONS` allows it (atomically); given fields overwrite the stored ones."""

    @abstractmethod
    async def append_tokens(self, request_id: str, start: int, token_ids: Sequence[int]) -> int:
        """Append at `start` (must be the stored count) and return the new count. An exact repeat of
        stored tokens is an idempotent retry; anything else raises `TokenConflict`."""

    @abstractmethod
    async def tokens(self, request_id: str, start: int = 0, end: int | None = None) -> list[int]: ...

    @abstractmethod
    async def num_tokens(self, request_id: str) -> int: ...

    @abstractmethod
    async def acquire_lease(self, request_id: str, role: str, owner: str, ttl_s: float) -> bool:
        """Take the lease if free or expired, or renew it if `owner` holds it already."""

    @abstractmethod
    async def renew_lease(self, request_id: str, role: str, owner: str, ttl_s: float) -> bool:
        """Extend the lease; False if `owner` does not hold it (any more)."""

    @abstractmethod
    async def release_lease(self, request_id: str, role: str, owner: str) -> bool: ...

    @abstractmethod
    async def lease_owner(self, request_id: str, role: str) -> str | None: ...

    @abstractmethod
    async def unfinished(self) -> list[str]:
        """Ids of the non-terminal requests, sorted (replicas scan these for orphans)."""

    @abstractmethod
    async def delete(self, request_id: str) -> bool:
        """Forget the record, its tokens and its idempotency key (leases expire on their own)."""

    @abstractmethod
    async def ping(self) -> bool:
        """True if the backend answers; False (never an exception) if it does not."""

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""


def check_lease_args(role: str, ttl_s: float | None = None) -> int:
    """Validate a lease's role (no ':', it separates key parts) and return its ttl in milliseconds."""
    if not role or ":" in role:
        raise ValueError(f"lease role must be non-empty without ':', got {role!r}")
    if ttl_s is None:
        return 0
    if ttl_s <= 0:
        raise ValueError(f"lease ttl must be positive, got {ttl_s}")
    return max(1, round(ttl_s * 1000))


def as_token_ids(token_ids: Sequence[int]) -> list[int]:
    """Plain ints: numpy integers are accepted, floats and strings refused (operator.index)."""
    return [operator.index(t) for t in token_ids]
