"""Request state for the orchestrator: records, generated tokens and leases, in memory or in Redis."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from orchestrator.state.memory_store import MemoryStateStore
from orchestrator.state.redis_store import RedisStateStore
from orchestrator.state.store import (
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    RequestExists,
    RequestRecord,
    RequestStatus,
    StateStore,
    StateStoreError,
    StateStoreUnavailable,
    TokenConflict,
    UnknownRequest,
)

__all__ = [
    "TERMINAL", "TRANSITIONS", "InvalidTransition", "MemoryStateStore", "RedisStateStore", "RequestExists",
    "RequestRecord", "RequestStatus", "StateStore", "StateStoreError", "StateStoreUnavailable", "TokenConflict",
    "UnknownRequest", "open_store",
]


def open_store(url: str | None, **kw: Any) -> StateStore:
    """None or memory:// -> in-process store; redis:// or rediss:// (TLS) -> Redis (connects lazily).

    `kw` goes to the store: `retention_s` for both, `prefix` and redis-py client options for Redis
    (`prefix` is ignored in memory, where nothing is shared, so one call site serves both).
    """
    scheme = "memory" if url is None else urlsplit(url).scheme.lower()
    if scheme == "memory":
        kw.pop("prefix", None)
        return MemoryStateStore(**kw)
    if scheme in ("redis", "rediss"):
        return RedisStateStore.from_url(url, **kw)
    # The scheme only: the URL may carry a password.
    raise ValueError(f"unsupported state store URL scheme {scheme!r} (expected memory://, redis:// or rediss://)")

