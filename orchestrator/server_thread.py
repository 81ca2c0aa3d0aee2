"""A TandemServer on a thread of its own, for callers that are not asyncio programs: the demo, tests,
a notebook. The server's event loop runs on the thread; `run` hands it a coroutine."""

from __future__ import annotations

import asyncio
import threading

from orchestrator.backend import Backend
from orchestrator.server import ServerConfig, TandemServer
from orchestrator.state import StateStore


class ServerThread:
    def __init__(self, config: ServerConfig, backend: Backend | None = None, store: StateStore | None = None,
                 span_exporter=None, start_timeout_s: float = 600) -> None:
        self.server = TandemServer(config, backend, store, span_exporter)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tandem-server", daemon=True)
        self._thread.start()
        self.port = self.run(self.server.start(), timeout=start_timeout_s)
        self.address = self.server.address

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, drain_s: float = 1.0) -> None:
        self.run(self.server.stop(drain_s), timeout=drain_s + 120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
