"""Prometheus metrics of one orchestrator replica, named after vLLM's under a `tandem_` prefix.

Request latencies are observed as requests stream (`RequestObserver` hooks the lifecycle calls).
Worker state (queue depth, KV blocks, speculation and KV-transfer totals) is read from a
snapshot the server refreshes in the background, so a scrape never waits on the engine.
Each server has its own registry: no global state, several servers per process in tests.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.backend import Snapshot

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class ServerMetrics:
    def __init__(self, model: str, drafter: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model, self.drafter = model, drafter
        labels = ["model"]
        r = self.registry
        self.ttft = Histogram("tandem_time_to_first_token_seconds",
                              "Arrival to first token streamed (waiting for admission included).", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Time between consecutive streamed chunks.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("tandem_request_time_per_output_token_seconds",
                              "(end-to-end - TTFT) / (output tokens - 1), per request.", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "Arrival to the request's end.", labels,
                             buckets=_REQUEST_BUCKETS, registry=r)
        self.finished = Counter("tandem_request_success", "Requests ended, by finish reason.",
                                [*labels, "finished_reason"], registry=r)
        self.rejected = Counter("tandem_requests_rejected", "Requests refused at admission, by status code.",
                                [*labels, "code"], registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of admitted requests.", labels,
                                     registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens streamed to clients.", labels,
                                         registry=r)
        self.running = Gauge("tandem_num_requests_running", "Requests running on this replica.", labels,
                             registry=r)
        self.waiting = Gauge("tandem_num_requests_waiting", "Requests queued at this replica's admission.",
                             labels, registry=r)
        self.failovers = Counter("tandem_failovers", "Requests taken up again, by what failed.",
                                 [*labels, "kind"], registry=r)
        self._workers = _WorkerCollector(model, drafter)
        r.register(self._workers)

    def update(self, snapshot: Snapshot) -> None:
        self._workers.snapshot = snapshot

    def observer(self, prompt_tokens: int) -> RequestObserver:
        self.prompt_tokens.labels(self.model).inc(prompt_tokens)
        return RequestObserver(self)


class RequestObserver:
    """One request's latency observations, fed by the lifecycle as its tokens stream."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0

    def tokens_streamed(self, n: int) -> None:
        if n <= 0:
            return
        now = time.monotonic()
        model = self.m.model
        if self.first is None:
            self.first = now
            self.m.ttft.labels(model).observe(now - self.start)
        else:
            self.m.itl.labels(model).observe(now - self.last)
        self.last = now
        self.tokens += n
        self.m.generation_tokens.labels(model).inc(n)

    def finished(self, finish_reason: str) -> None:
        now, model = time.monotonic(), self.m.model
        self.m.e2e.labels(model).observe(now - self.start)
        if self.first is not None and self.tokens > 1:
            self.m.tpot.labels(model).observe((now - self.first) / (self.tokens - 1))
        self.m.finished.labels(model, finish_reason).inc()


class _WorkerCollector(Collector):
    """Per-worker gauges and the backend's running totals, from the latest snapshot."""

    def __init__(self, model: str, drafter: str) -> None:
        self.model, self.drafter = model, drafter
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator:
        snap = self.snapshot
        if snap is None:
            return
        labels = ["model", "stage", "worker"]
        usage = GaugeMetricFamily("tandem_kv_cache_usage_perc", "Fraction of KV blocks in use.", labels=labels)
        used = GaugeMetricFamily("tandem_kv_blocks_used", "KV blocks in use.", labels=labels)
        queued = GaugeMetricFamily("tandem_worker_queued_tokens", "Tokens a worker has yet to compute.",
                                   labels=labels)
        running = GaugeMetricFamily("tandem_worker_requests", "Requests on a worker (running and waiting).",
                                    labels=labels)
        for w in snap.loads:
            key = [self.model, w.stage, w.worker_id]
            total = w.used_blocks + w.free_blocks
            usage.add_metric(key, w.used_blocks / total if total else 0.0)
            used.add_metric(key, w.used_blocks)
            queued.add_metric(key, w.queued_tokens)
            running.add_metric(key, w.running + w.waiting)
        yield from (usage, used, queued, running)

        spec_labels = ["model", "drafter"]
        c = snap.speculation
        for name, key, doc in (
            ("tandem_spec_decode_num_drafts", "drafts", "Verify steps of a request that carried a draft."),
            ("tandem_spec_decode_num_draft_tokens", "draft_tokens", "Draft tokens verified."),
            ("tandem_spec_decode_num_accepted_tokens", "accepted_tokens", "Draft tokens accepted."),
            ("tandem_decode_steps", "decode_steps", "(request, step) pairs that committed tokens after the first."),
            ("tandem_decode_tokens", "decode_tokens", "Tokens those steps committed."),
            ("tandem_engine_steps", "steps", "Batched steps that ran a forward pass."),
            ("tandem_forward_seconds", "forward_seconds", "Seconds those steps spent in the forward pass."),
            ("tandem_draft_seconds", "draft_seconds", "Seconds those steps spent drafting."),
            ("tandem_spec_controller_expected_accepted_tokens", "expected_accepted",
             "Draft tokens the goodput controller expected its kept nodes to gain."),
            ("tandem_spec_controller_accepted_tokens", "controlled_accepted", "Draft tokens those nodes gained."),
            ("tandem_spec_controller_steps", "controlled_steps", "Steps that verified nodes the controller kept."),
            ("tandem_spec_controller_predicted_seconds", "predicted_seconds",
             "Those steps' seconds as the controller's cost model predicted them."),
            ("tandem_spec_controller_measured_seconds", "controlled_seconds",
             "Those steps' seconds as measured (drafting aside)."),
        ):
            counter = CounterMetricFamily(name, doc, labels=spec_labels)
            counter.add_metric([self.model, self.drafter], c.get(key, 0))
            yield counter
        steps, drafted = c.get("decode_steps", 0), c.get("draft_tokens", 0)
        rate = GaugeMetricFamily("tandem_spec_decode_acceptance_rate", "Accepted / draft tokens, since start.",
                                 labels=spec_labels)
        rate.add_metric([self.model, self.drafter], c.get("accepted_tokens", 0) / drafted if drafted else 0.0)
        mat = GaugeMetricFamily("tandem_spec_decode_mean_accepted_tokens",
                                "Tokens per decode step (bonus token included), since start.", labels=spec_labels)
        mat.add_metric([self.model, self.drafter], c.get("decode_tokens", 0) / steps if steps else 0.0)
        yield from (rate, mat)

        t = snap.transfer
        for name, key, doc in (("tandem_kv_transfer_bytes", "bytes", "KV bytes moved between workers."),
                               ("tandem_kv_transfer_seconds", "seconds", "Seconds spent moving KV between workers."),
                               ("tandem_kv_transfers", "transfers", "KV transfers between workers."),
                               ("tandem_kv_transfer_failures", "failures", "KV transfers that failed.")):
            counter = CounterMetricFamily(name, doc, labels=["model"])
            counter.add_metric([self.model], t.get(key, 0))
            yield counter
