"""A Tandem gRPC server on a real socket, its asyncio loop on a thread, for tests that call it
with real gRPC clients."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from orchestrator.backend import Backend
from orchestrator.server import ServerConfig, TandemServer
from orchestrator.state import StateStore
from tandem.v1 import tandem_pb2_grpc as pb_grpc


class ServerThread:
    def __init__(self, config: ServerConfig, backend: Backend | None = None, store: StateStore | None = None,
                 span_exporter=None) -> None:
        self.server = TandemServer(config, backend, store, span_exporter)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self._thread.start()
        self.port = self.run(self.server.start(), timeout=600)
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stub(self, channel: grpc.Channel) -> pb_grpc.TandemStub:
        return pb_grpc.TandemStub(channel)

    def stop(self, drain_s: float = 1.0) -> None:
        self.run(self.server.stop(drain_s))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextmanager
def serving(config: ServerConfig, backend: Backend | None = None, store: StateStore | None = None,
            ) -> Iterator[tuple[ServerThread, pb_grpc.TandemStub]]:
    server = ServerThread(config, backend, store)
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield server, pb_grpc.TandemStub(channel)
    finally:
        server.stop()
