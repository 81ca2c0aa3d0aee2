"""The orchestrator process: the gRPC server, its health and reflection services, and what they run on.

    server = TandemServer(ServerConfig(port=0))
    port = await server.start()      # loads the model or starts the stage pools
    ...
    await server.stop()              # NOT_SERVING, drain, close

Graceful shutdown: health turns NOT_SERVING first (load balancers and Kubernetes stop sending),
new requests get UNAVAILABLE, running ones get `drain_s` to finish, then the rest are cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import start_http_server

from orchestrator.admission import Admission, AdmissionConfig
from orchestrator.backend import Backend, start_backend
from orchestrator.engine_driver import EngineDriver
from orchestrator.http_gateway import HttpGateway
from orchestrator.lifecycle import LifecycleConfig, RequestManager
from orchestrator.metrics import ServerMetrics
from orchestrator.security import ApiKeyInterceptor, SecurityConfig, StreamLimiter
from orchestrator.service import TandemService
from orchestrator.state import RedisStateStore, StateStore, open_store
from orchestrator.tracing import TracingConfig, make_tracer
from orchestrator.validation import RequestLimits, RequestValidator
from services.cluster.config import DeploymentConfig
from services.runtime.engine import EngineConfig
from services.spec.config import SpecConfig
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tandem"].full_name  # "tandem.v1.Tandem"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    """0 picks a free port (tests)."""
    mode: str = "embedded"
    """"embedded" (the engine in this process), "colocated" or "disaggregated" (stage pools on Ray)."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(speculation=SpecConfig(drafter="auto")))
    deployment: DeploymentConfig | None = None
    """Pools for the Ray modes; its engine section then replaces `engine`."""
    redis_url: str | None = None
    """None: in-memory request state (one replica). redis:// or rediss:// (TLS), password in the URL."""
    redis_prefix: str = "tandem"
    """Key prefix in Redis: deployments sharing one Redis use different prefixes."""
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    drain_s: float = 10.0
    security: SecurityConfig = field(default_factory=SecurityConfig)
    """API keys, TLS, streams per key."""
    metrics_port: int | None = None
    """Serve Prometheus metrics over HTTP on this port (0 picks a free one); None: no endpoint
    (the metrics are still kept, e.g. for an HTTP gateway's /metrics)."""
    http_port: int | None = None
    """Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models) on
    this port (0 picks a free one); None: gRPC only."""
    tracing: TracingConfig = field(default_factory=TracingConfig)
    metrics_interval_s: float = 1.0
    """How often worker state (queues, KV blocks, speculation totals) is refreshed for the metrics."""

    @classmethod
    def with_deployment_file(cls, path: Path, **kw) -> ServerConfig:
        deployment = DeploymentConfig.from_yaml(path)
        return cls(mode=deployment.mode, deployment=deployment, engine=deployment.engine, **kw)


class TandemServer:
    def __init__(self, config: ServerConfig = ServerConfig(), backend: Backend | None = None,
                 store: StateStore | None = None, span_exporter: SpanExporter | None = None) -> None:
        self.config = config
        self.tracer, self._tracer_provider = make_tracer(config.tracing, span_exporter)
        self.backend = backend
        self.store = store
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics: ServerMetrics | None = None
        self._metrics_http = None
        self.gateway: HttpGateway | None = None
        self.http_port: int | None = None
        self._socket_dir: tempfile.TemporaryDirectory | None = None
        self._serving = False
        self._refresh: asyncio.Task | None = None
        self._server: grpc.aio.Server | None = None
        self.driver: EngineDriver | None = None
        self.manager: RequestManager | None = None
        self.health = HealthServicer()

    def _deployment_config(self) -> DeploymentConfig | None:
        """The deployment to start; its workers export spans where this server does."""
        cfg = self.config
        endpoint = cfg.tracing.otlp_endpoint
        if cfg.mode == "embedded" or not endpoint or (cfg.deployment and cfg.deployment.otlp_endpoint):
            return cfg.deployment
        return dataclasses.replace(cfg.deployment or DeploymentConfig(mode=cfg.mode, engine=cfg.engine),
                                   otlp_endpoint=endpoint)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        cfg = self.config
        if self.backend is None:  # loaded on the thread that will step it (see EngineDriver)
            self.driver = EngineDriver(tracer=self.tracer)
            deployment = self._deployment_config()
            try:
                self.backend = await self.driver.build(lambda: start_backend(cfg.mode, cfg.engine, deployment),
                                                       lambda backend: backend.loop)
            except BaseException:
                await asyncio.to_thread(self.driver.stop)
                raise
        else:
            self.driver = EngineDriver(self.backend.loop, tracer=self.tracer)
        if self.store is None:
            self.store = open_store(cfg.redis_url, **({"prefix": cfg.redis_prefix} if cfg.redis_url else {}))
        self.metrics = ServerMetrics(self.backend.model.name, self.backend.model.drafter)
        snapshot = await self.driver.call(lambda _: self.backend.snapshot())
        self.metrics.update(snapshot)
        admission = Admission(cfg.admission, self.backend.kv_capacity_tokens(snapshot))
        self.manager = RequestManager(self.driver, self.store, cfg.lifecycle, self.backend.tokenizer.decode,
                                      self.metrics, admission, self.tracer)
        await self.manager.start()
        self._refresh = asyncio.create_task(self._refresh_metrics(), name="metrics-refresh")
        if cfg.metrics_port is not None:
            self._metrics_http, _ = start_http_server(cfg.metrics_port, cfg.host, registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        validator = RequestValidator(self.backend.model, self.backend.tokenizer, cfg.limits)
        store_kind = "redis" if isinstance(self.store, RedisStateStore) else "memory"
        # The transport's cap is twice the validated limit, so an oversized request still reaches the
        # validator (INVALID_ARGUMENT naming the field) while a huge one is refused unread.
        transport_cap = 2 * cfg.limits.max_request_bytes
        options = [("grpc.max_receive_message_length", transport_cap),
                   ("grpc.max_send_message_length", transport_cap)]
        sec = cfg.security
        self._server = grpc.aio.server(options=options,
                                       interceptors=[ApiKeyInterceptor(sec.api_keys)] if sec.api_keys else None)
        service = TandemService(self.backend, self.driver, self.manager, validator, self.store, store_kind,
                                StreamLimiter(sec.max_streams_per_key))
        pb_grpc.add_TandemServicer_to_server(service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection([SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME],
                                            self._server)
        credentials = sec.server_credentials()
        if credentials is None:
            self.port = self._server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        else:
            self.port = self._server.add_secure_port(f"{cfg.host}:{cfg.port}", credentials)
        if self.port == 0:
            raise OSError(f"could not listen on {cfg.host}:{cfg.port}")
        if cfg.http_port is not None:  # the gateway reaches this server over a Unix socket, TLS or not
            self._socket_dir = tempfile.TemporaryDirectory(prefix="tandem-")
            local = f"unix:{self._socket_dir.name}/grpc.sock"
            self._server.add_insecure_port(local)
        await self._server.start()
        if cfg.http_port is not None:
            self.gateway = HttpGateway(local, self.metrics.registry, lambda: self._serving)
            self.http_port = await self.gateway.start(cfg.host, cfg.http_port)
        self._serving = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (%s, state in %s%s%s)", self.backend.model.name, self.address, cfg.mode, store_kind,
                 ", TLS" if credentials else "", ", API keys" if sec.api_keys else "")
        return self.port

    async def stop(self, drain_s: float | None = None) -> None:
        """NOT_SERVING, let running requests finish for up to `drain_s`, cancel the rest, close."""
        drain_s = self.config.drain_s if drain_s is None else drain_s
        if self._server is None:
            return
        self._serving = False
        await self.health.enter_graceful_shutdown()
        if self.gateway is not None:
            await self.gateway.stop()
        await self._server.stop(grace=drain_s)  # refuses new RPCs, waits for the streams in flight
        if self._refresh is not None:
            self._refresh.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.manager is not None:
            await self.manager.stop()
        if self.driver is not None:
            await asyncio.to_thread(self.driver.stop)
        if self.store is not None:
            await self.store.close()
        if self.backend is not None:
            await asyncio.to_thread(self.backend.shutdown)
        if self._socket_dir is not None:
            self._socket_dir.cleanup()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()  # flushes spans still batched
        self._server = None

    async def _refresh_metrics(self) -> None:
        """Worker state for the metrics and the admission budget, every `metrics_interval_s`."""
        while True:
            try:
                snapshot = await self.driver.call(lambda _: self.backend.snapshot())
                self.metrics.update(snapshot)
                capacity = self.backend.kv_capacity_tokens(snapshot)
                if capacity != self.manager.admission.capacity:  # a pool grew, shrank or lost a worker
                    self.manager.admission.set_capacity(capacity)
            except Exception:  # a worker that does not answer must not stop the refreshes
                log.exception("could not read the workers' state for the metrics")
            await asyncio.sleep(self.config.metrics_interval_s)

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
