"""A Redis for tests: the developer's on 127.0.0.1:6379 if it answers, else a throw-away `redis-server`.

`RedisServer` owns one server process with nothing on disk (`--save "" --appendonly no`), so a
restart on the same port is "Redis came back empty", the fault the orchestrator must survive.
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def answers_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """A raw RESP PING, so probing needs neither redis-py's retries nor redis-cli."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")  # -NOAUTH (a password-protected server) is no use to us
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """One `redis-server` on 127.0.0.1, kept on its port across restarts."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or redis_binary()
        if self.binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-redis-")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running:
            return self
        log = Path(self._dir.name) / "redis.log"
        self._proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self._dir.name, "--logfile", str(log), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not answers_ping("127.0.0.1", self.port, timeout=0.2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: with no persistence configured nothing is written
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> RedisServer:
        """Stop and start again on the same port: a Redis that lost everything."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


_own: RedisServer | None = None


def redis_url() -> str:
    """The URL of a Redis to test against (started once per process if needed); skips if there is none."""
    global _own
    if answers_ping("127.0.0.1", 6379):
        return DEFAULT_URL
    if _own is None:
        if redis_binary() is None:
            pytest.skip("no Redis answers on 127.0.0.1:6379 and redis-server is not on PATH")
        _own = RedisServer().start()
        atexit.register(_own.close)
    return _own.url


def drop_keys(url: str, prefix: str) -> None:
    """Delete every key under `prefix:` (a test's own namespace) from the Redis at `url`."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
