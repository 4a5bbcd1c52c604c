"""Feedback: turns logged predictions and corrections into training examples.

Its training store (`flywheel.store`) is the hand-off to the learner; the worker
(`flywheel feedback`) joins, analyzes and writes examples; `error_report` summarizes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The worker side (analysis, counterexamples, registry loading) imports torch and MLflow;
# loaded on first use so `flywheel db ...` and store-only callers start in a fraction of it.
_LAZY = {
    "AnalyzerConfig": "analyzer",
    "Verdict": "analyzer",
    "analyze": "analyzer",
    "assign_split": "analyzer",
    "Counterexample": "counterexamples",
    "CounterexampleConfig": "counterexamples",
    "ReferenceStats": "reference",
    "error_report": "report",
    "build_worker": "runner",
    "tune_worker_process": "runner",
    "FeedbackCollector": "metrics",
    "serve_metrics": "metrics",
    "FeedbackWorker": "worker",
    "WorkerStats": "worker",
    "WorkerObserver": "observer",
    "WorkerStep": "observer",
}


def __getattr__(name: str) -> Any:
    if name == "generate_counterexamples":
        return importlib.import_module("flywheel.feedback.counterexamples").generate
    if name in _LAZY:
        return getattr(importlib.import_module(f"flywheel.feedback.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'flywheel.feedback' has no attribute {name!r}")


if TYPE_CHECKING:
    from flywheel.feedback.analyzer import AnalyzerConfig, Verdict, analyze, assign_split
    from flywheel.feedback.counterexamples import Counterexample, CounterexampleConfig
    from flywheel.feedback.counterexamples import generate as generate_counterexamples
    from flywheel.feedback.metrics import FeedbackCollector, serve_metrics
    from flywheel.feedback.observer import WorkerObserver, WorkerStep
    from flywheel.feedback.reference import ReferenceStats
    from flywheel.feedback.report import error_report
    from flywheel.feedback.runner import build_worker, tune_worker_process
    from flywheel.feedback.worker import FeedbackWorker, WorkerStats

__all__ = [
    "AnalyzerConfig",
    "Counterexample",
    "CounterexampleConfig",
    "FeedbackCollector",
    "FeedbackWorker",
    "ReferenceStats",
    "Verdict",
    "WorkerObserver",
    "WorkerStats",
    "WorkerStep",
    "analyze",
    "assign_split",
    "build_worker",
    "error_report",
    "generate_counterexamples",
    "serve_metrics",
    "tune_worker_process",
]
