"""Prometheus metrics of the privacy layer (the learner's registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

REFUSALS = Counter(
    "flywheel_privacy_refusals_total",
    "DP updates refused before training because of the budget",
    ["reason"],
)
EXCLUDED_SOURCES = Counter(
    "flywheel_privacy_excluded_sources_total",
    "Sources left out of an update: their budget is spent",
)
EPSILON = Gauge("flywheel_privacy_epsilon", "ε spent by the worst source of a lineage", ["lineage"])
