"""Prometheus metrics for the service, on a registry of its own per app instance."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    @classmethod
    def create(cls) -> ServiceMetrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            requests=Counter("flywheel_http_requests", "HTTP requests by route and status",
                             ["route", "status"], registry=reg),
            latency=Histogram("flywheel_http_request_duration_seconds",
                              "HTTP request latency by route", ["route"],
                              buckets=LATENCY_BUCKETS, registry=reg),
            predictions=Counter("flywheel_predictions", "Predictions served", ["model_version"],
                                registry=reg),
            corrections=Counter("flywheel_corrections_accepted", "Corrections accepted",
                                registry=reg),
            queue_depth=Gauge("flywheel_log_queue_depth",
                              "Records waiting in the in-memory logging queue", registry=reg),
            spooled=Gauge("flywheel_log_spooled_records",
                          "Records in the on-disk spool, not yet acknowledged by Kafka",
                          registry=reg),
            model_version=Gauge("flywheel_model_info", "Served model (value is always 1)",
                                ["name", "version"], registry=reg),
        )
