"""Prometheus metrics for the service, on a registry of its own per app instance."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel.retry import DependencyStatus

if TYPE_CHECKING:
    from flywheel.service.event_log import EventLog
    from flywheel.service.model_follower import FollowerStats

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class ServiceMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    predictions: Counter
    corrections: Counter
    queue_depth: Gauge
    spooled: Gauge
    model_version: Gauge
    unknown_categories: Counter
    rate_limited: Counter
    spool_refused: Counter
    spool_bytes: Gauge

    @classmethod
    def create(cls) -> ServiceMetrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter(
                "flywheel_http_requests",
                "HTTP requests by route and status",
                ["route", "status"],
                registry=reg,
            ),
            latency=Histogram(
                "flywheel_http_request_duration_seconds",
                "HTTP request latency by route",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=reg,
            ),
            predictions=Counter(
                "flywheel_predictions", "Predictions served", ["model_version"], registry=reg
            ),
            corrections=Counter(
                "flywheel_corrections_accepted", "Corrections accepted", registry=reg
            ),
            queue_depth=Gauge(
                "flywheel_log_queue_depth",
                "Records waiting in the in-memory logging queue",
                registry=reg,
            ),
            spooled=Gauge(
                "flywheel_log_spooled_records",
                "Records in the on-disk spool, not yet acknowledged by Kafka",
                registry=reg,
            ),
            model_version=Gauge(
                "flywheel_model_info",
                "Served model (value is always 1)",
                ["name", "version"],
                registry=reg,
            ),
            # by model name, not version: the vocabulary is the lineage's, fixed at init
            unknown_categories=Counter(
                "flywheel_unknown_categories",
                "Values of a categorical feature outside its vocabulary, served through "
                "its unknown bucket",
                ["model", "feature"],
                registry=reg,
            ),
            # by app: the label set is bounded by the apps that exist (FLYWHEEL_AUTH=off:
            # the one shared "anonymous")
            rate_limited=Counter(
                "flywheel_rate_limited",
                "Requests refused with 429: over their app's rate limit",
                ["app", "scope"],
                registry=reg,
            ),
            spool_refused=Counter(
                "flywheel_spool_full_refusals",
                "Requests refused with 503 because the spool was full (FLYWHEEL_SPOOL_MAX_BYTES)",
                ["kind"],
                registry=reg,
            ),
            spool_bytes=Gauge(
                "flywheel_log_spool_bytes",
                "Bytes in the on-disk spool, not yet acknowledged by Kafka",
                registry=reg,
            ),
        )


class FollowerCollector:
    """The registry follower's counters, read at scrape time (zeros while it does not run)."""

    def __init__(self, stats: Callable[[], FollowerStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()

        def value(attr: str) -> float:
            return float(getattr(s, attr)) if s is not None else 0.0

        yield CounterMetricFamily(
            "flywheel_model_swaps",
            "Versions the registry follower loaded, warmed and swapped in",
            value=value("swaps"),
        )
        yield CounterMetricFamily(
            "flywheel_model_swap_failures",
            "Champion versions that could not be loaded or warmed (the old one kept serving)",
            value=value("failures"),
        )
        yield CounterMetricFamily(
            "flywheel_model_registry_errors",
            "Checks that could not read the champion alias",
            value=value("registry_errors"),
        )
        events = CounterMetricFamily(
            "flywheel_model_events",
            "Records read from the model-events topic, by outcome",
            labels=["outcome"],
        )
        for outcome in ("followed", "ignored", "malformed"):
            events.add_metric([outcome], value(f"events_{outcome}"))
        yield events
        yield GaugeMetricFamily(
            "flywheel_model_last_swap_seconds",
            "Load + warm time of the last swap",
            value=value("last_swap_s"),
        )


def v2_route(path: str) -> str:
    """The label of an Open Inference Protocol path: its template (model names and
    versions in URLs must not grow the label set), or `other`.

    >>> v2_route("/v2/models/fraud/versions/3/infer"), v2_route("/v2/models/fraud/x")
    ('/v2/models/{name}/infer', 'other')
    """
    if path in V2_ROUTES:
        return path
    parts = path.split("/")  # "", "v2", "models", name, ...
    if len(parts) < 4 or parts[1:3] != ["v2", "models"] or not parts[3]:
        return "other"
    rest = parts[4:]
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        rest = rest[2:]
    if not rest:
        return "/v2/models/{name}"
    if len(rest) == 1 and rest[0] in ("infer", "ready"):
        return f"/v2/models/{{name}}/{rest[0]}"
    return "other"


V2_ROUTES = frozenset({"/v2", "/v2/health/live", "/v2/health/ready"})


class RequestMetrics:
    """Counts and times every request by route and status, in plain ASGI (cheap); a path
    outside `routes` is counted as `other`, so unknown URLs cannot grow the label set
    (`/v2/...` paths by their template, `v2_route`)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Collection[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in self.routes:
            route = path
        elif path.startswith("/v2"):
            route = v2_route(path)
        else:
            route = "other"
        status = 500
        start = time.perf_counter()

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, str(status)).inc()


class DependencyCollector:
    """`flywheel_dependency_up{dependency=...}`: the registry as the first load and the
    follower last saw it, Kafka as the prediction log sees it (read at scrape time)."""

    def __init__(self, status: DependencyStatus, event_log: Callable[[], EventLog | None]):
        self._status = status
        self._event_log = event_log

    def collect(self) -> Iterator[Metric]:
        refresh_kafka(self._status, self._event_log())
        yield from self._status.collect()


def refresh_kafka(status: DependencyStatus, event_log: EventLog | None) -> None:
    """Copy the prediction log's view of the broker into `status` ("kafka")."""
    if event_log is None or event_log.connected:
        status.up("kafka")
    else:
        status.down("kafka", "the prediction log cannot reach Kafka (records are spooled)")


class EventLogCollector:
    """The prediction log's counters, read at scrape time (zeros before it exists)."""

    def __init__(self, event_log: Callable[[], EventLog | None]) -> None:
        self._event_log = event_log

    def collect(self) -> Iterator[Metric]:
        el = self._event_log()
        stats = el.stats if el else None
        for name, doc, attr in (
            ("flywheel_log_delivered", "Records acknowledged by Kafka", "delivered"),
            ("flywheel_log_spooled", "Records written to the spool", "spooled"),
            ("flywheel_log_replayed", "Spooled records replayed to Kafka", "replayed"),
            ("flywheel_log_send_failures", "Batches Kafka did not acknowledge", "send_failures"),
            ("flywheel_log_batches", "Batches of queued records sent to Kafka", "batches"),
            (
                "flywheel_log_direct_spooled",
                "Records a request spooled itself, Kafka's acknowledgement being late",
                "direct_spooled",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=getattr(stats, attr, 0) if stats else 0)
