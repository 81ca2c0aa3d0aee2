"""A Tandem gRPC server on a real socket for tests that call it with real gRPC clients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from orchestrator.backend import Backend
from orchestrator.server import ServerConfig
from orchestrator.server_thread import ServerThread
from orchestrator.state import StateStore
from tandem.v1 import tandem_pb2_grpc as pb_grpc


@contextmanager
def serving(config: ServerConfig, backend: Backend | None = None, store: StateStore | None = None,
            ) -> Iterator[tuple[ServerThread, pb_grpc.TandemStub]]:
    server = ServerThread(config, backend, store)
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield server, stub(channel)
    finally:
        server.stop()


def stub(channel: grpc.Channel) -> pb_grpc.TandemStub:
    return pb_grpc.TandemStub(channel)
