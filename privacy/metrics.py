"""Prometheus metrics of the privacy layer (the learner's registry, its /metrics port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

REFUSALS = Counter(
    "flywheel_privacy_refusals_total",
    "DP updates refused before training because of the budget",
    ["reason"],
)
EXCLUDED_SOURCES = Counter(
    "flywheel_privacy_excluded_sources_total",
    "Privacy units (data subjects, else predictions) left out of an update: their budget is spent",
)
EPSILON = Gauge(
    "flywheel_privacy_epsilon", "ε spent by the worst privacy unit of a lineage", ["lineage"]
)
INCOMING_EXAMPLES = Counter(
    "flywheel_privacy_incoming_examples_total",
    "New trainable examples a DP update of the lineage was planned on",
    ["lineage"],
)
EXCLUDED_EXAMPLES = Counter(
    "flywheel_privacy_excluded_examples_total",
    "New trainable examples that can no longer be trained on: their privacy unit's budget "
    "is spent (share: divide by flywheel_privacy_incoming_examples_total)",
    ["lineage"],
)
