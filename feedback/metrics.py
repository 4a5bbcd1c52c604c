"""Prometheus metrics of a feedback worker: its counters and the rolling error report."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import Engine

from flywheel.feedback.report import error_report
from flywheel.feedback.worker import FeedbackWorker
from flywheel.store import session_factory

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

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
        with self._sessions() as session:
            report = error_report(session, self.model_name, REPORT_HOURS)
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


def serve_metrics(
    port: int, collector: FeedbackCollector, addr: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    registry = CollectorRegistry()
    registry.register(collector)
    return start_http_server(port, addr=addr, registry=registry)
