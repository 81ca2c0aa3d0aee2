"""API keys and per-key limits for the gRPC port.

Keys arrive as `authorization: Bearer <key>` metadata. With no keys configured every caller is
let in. The health service stays open either way: Kubernetes' gRPC probes send no metadata.
Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
ANONYMOUS = "-"  # the key name of callers of a server without keys


@dataclass(frozen=True)
class SecurityConfig:
    api_keys: tuple[str, ...] = ()
    """Accepted keys; empty: no authentication."""
    tls_cert_file: Path | None = None
    """PEM certificate chain; with tls_key_file, the gRPC port speaks TLS only."""
    tls_key_file: Path | None = None
    max_streams_per_key: int | None = None
    """Concurrent Generate / Resume streams one key (or, without keys, the whole server) may hold."""

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: give both or neither")
        if any(not k or any(c.isspace() for c in k) for k in self.api_keys):
            raise ValueError("api_keys: keys must be non-empty and hold no whitespace")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert_file is None:
            return None
        return grpc.ssl_server_credentials([(self.tls_key_file.read_bytes(), self.tls_cert_file.read_bytes())])


def read_api_keys(path: Path | None = None, env: str = "TANDEM_API_KEYS") -> tuple[str, ...]:
    """Keys from a file (one per line, # comments) and/or the environment (comma-separated): never
    from the command line, where `ps` would show them."""
    keys: list[str] = []
    if path is not None:
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    keys += [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


def caller_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in the call's metadata, if any."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def allowed(self, key: str | None) -> bool:
        if key is None:
            return False
        given = key.encode()
        return any(hmac.compare_digest(given, k) for k in self._keys)  # constant time per key

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        if self.allowed(caller_key(details.invocation_metadata)):
            return handler
        return _denied(handler)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or unknown API key: send metadata 'authorization: Bearer <key>'"

    async def deny(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # makes this an async generator, as a streaming handler must be

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)


class StreamLimiter:
    """Counts the open streams of each key; a stream past the limit is refused."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    @asynccontextmanager
    async def slot(self, key: str, refuse: Callable[[str], Awaitable[None]]):
        if self.limit is not None and self.open.get(key, 0) >= self.limit:
            await refuse(f"this API key already has {self.limit} streams open, the most it may; retry later")
        self.open[key] = self.open.get(key, 0) + 1
        try:
            yield
        finally:
            self.open[key] -= 1
            if not self.open[key]:
                del self.open[key]
