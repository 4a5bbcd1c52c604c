"""Prometheus metrics of a feedback worker: its counters and the rolling error report; and
its health: `GET /healthz` (the process answers) and `GET /readyz` (200 while the worker
consumes and reaches its store and broker; 503, naming what is down, while it waits one
out or is still starting), on FLYWHEEL_FEEDBACK_METRICS_PORT beside `/metrics`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import Engine

from flywheel.feedback.report import error_report
from flywheel.feedback.worker import FeedbackWorker
from flywheel.retry import DependencyStatus
from flywheel.store import session_factory

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)
REPORT_HOURS = 1.0


class FeedbackCollector:
    """Reads the worker's stats and, on each scrape, the last hour of error counters."""

    def __init__(self, worker: FeedbackWorker, engine: Engine, model_name: str) -> None:
        self.worker, self.model_name = worker, model_name
        self._sessions = session_factory(engine)

    def collect(self) -> Iterator[Metric]:
        for f in fields(self.worker.stats):
            value = getattr(self.worker.stats, f.name)
            if isinstance(value, int):
                yield CounterMetricFamily(
                    f"flywheel_feedback_{f.name}",
                    f"Feedback worker: {f.name.replace('_', ' ')}",
                    value=value,
                )
        try:
            with self._sessions() as session:
                report = error_report(session, self.model_name, REPORT_HOURS)
        except Exception as exc:  # the store is down: the counters still answer
            log.debug("error report unavailable: %s", exc)
            return
        rate = GaugeMetricFamily(
            "flywheel_feedback_error_rate",
            "Share of corrected predictions that were wrong, last hour",
            labels=["model_version"],
        )
        errors = GaugeMetricFamily(
            "flywheel_feedback_errors",
            "Errors by type in the last hour",
            labels=["model_version", "error_type"],
        )
        for v in report["versions"]:
            rate.add_metric([v["model_version"]], v["error_rate"])
            for error_type, n in v["error_types"].items():
                errors.add_metric([v["model_version"], error_type], n)
        yield rate
        yield errors


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request: a slow scrape (the error report) never holds up /readyz."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        """Scrapes and probes every few seconds: not worth a log line each."""


def health_app(
    registry: CollectorRegistry, status: DependencyStatus, running: Callable[[], bool]
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """`/healthz`, `/readyz` (ready: `running()` and every dependency up) and, on any
    other path, the metrics of `registry`."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics(environ, start_response)
        body: dict[str, object]
        if path == "/healthz":
            code, body = "200 OK", {"status": "ok"}
        else:
            ready = running() and status.ready
            body = {
                "ready": ready,
                "consuming": running(),
                "dependencies": status.states(),
                "down": status.reasons(),
            }
            code = "200 OK" if ready else "503 Service Unavailable"
        data = json.dumps(body).encode()
        start_response(code, [("Content-Type", "application/json")])
        return [data]

    return app


def serve_metrics(
    port: int,
    collector: FeedbackCollector | None = None,
    addr: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
    status: DependencyStatus | None = None,
    running: Callable[[], bool] | None = None,
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `/metrics` (the `collector`, and whatever is registered in `registry` later),
    `/healthz` and `/readyz` on a daemon thread; `server.shutdown()` stops it.

    Started before the worker is built, so a start-up that waits out an outage already
    answers (not ready) and shows `flywheel_dependency_up`."""
    registry = registry or CollectorRegistry()
    status = status or DependencyStatus()
    if collector is not None:
        registry.register(collector)
    registry.register(status)
    app = health_app(registry, status, running or (lambda: True))
    server = make_server(addr, port, app, server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, name="flywheel-feedback-metrics", daemon=True
    )
    thread.start()
    return server, thread
