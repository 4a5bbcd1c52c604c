"""From joined corrections to training rows: the correction itself, its verdict, its
counterexamples (bounded per source), and the error counters behind the reports."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from torch import nn

from flywheel.events import utcnow
from flywheel.feedback.analyzer import AnalyzerConfig, analyze, assign_split
from flywheel.feedback.counterexamples import CounterexampleConfig, generate
from flywheel.feedback.join import JoinedPair
from flywheel.feedback.reference_data import LabelledPool
from flywheel.feedback.store import Example, Origin, Split
from flywheel.feedback.store.models import ErrorCount
from flywheel.settings import Settings

log = logging.getLogger(__name__)
ModelLoader = Callable[[str], "tuple[list[str], nn.Module] | None"]


def _seed_of(key: str) -> int:
    """A per-correction seed: a replayed batch makes exactly the same counterexamples."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


class ExampleBuilder:
    """Called by the worker inside its store transaction with the pairs it just joined."""

    def __init__(self, settings: Settings, pool: LabelledPool, load_model: ModelLoader,
                 analyzer: AnalyzerConfig | None = None,
                 counterexamples: CounterexampleConfig | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.load_model = load_model
        self.analyzer = analyzer or AnalyzerConfig()
        self.counterexamples = counterexamples or CounterexampleConfig()
        self._models: dict[str, tuple[list[str], nn.Module] | None] = {}

    def _model(self, version: str) -> tuple[list[str], nn.Module] | None:
        if version not in self._models:
            try:
                self._models[version] = self.load_model(version)
            except Exception as exc:  # the gradient-sign strategy is skipped, not the join
                log.warning("model version %s unavailable (%s); no gradient-sign variants",
                            version, exc)
                self._models[version] = None
        return self._models[version]

    def __call__(self, session: Session, pairs: list[JoinedPair]) -> list[dict]:
        if not pairs:
            return []
        now = utcnow()
        budget = self._budget_left(session, {p.source for p in pairs}, now)
        rows: list[dict] = []
        outcomes: Counter[tuple[str, str, datetime, str, str, str]] = Counter()
        for p in pairs:
            x = np.asarray(p.features, dtype=np.float64)
            verdict = analyze(p.features, p.probabilities, p.predicted, p.true_label,
                              self.pool.reference,
                              self.pool.near(x, self.analyzer.neighbours), self.analyzer)
            split = (Split.QUARANTINE.value if not verdict.trainable
                     else assign_split(p.prediction_id, self.settings.holdout_fraction))
            rows.append({"dedup_key": f"correction:{p.correction_id}",
                         "origin": Origin.CORRECTION.value, "error_type": verdict.error_type,
                         "parent_prediction_id": p.prediction_id, "features": p.features,
                         "label": p.true_label, "weight": 1.0, "split": split,
                         "source": p.source, "created_at": now})
            hour = p.corrected_at.replace(minute=0, second=0, microsecond=0)
            outcomes[(p.model_name, p.model_version, hour, p.predicted, p.true_label,
                      verdict.error_type or "correct")] += 1
            if split != Split.TRAIN.value:
                continue  # holdout and quarantine never leak into training via variants
            if verdict.error_type is None:
                continue
            rows += self._variants(p, x, verdict.error_type, budget, now)
        self._count(session, outcomes)
        return rows

    def _variants(self, p: JoinedPair, x: np.ndarray, error_type: str,
                  budget: dict[str | None, int], now: datetime) -> list[dict]:
        left = budget.get(p.source, self.settings.counterexample_budget)
        if left <= 0:
            return []
        loaded = self._model(p.model_version)
        labels = loaded[0] if loaded else sorted(p.probabilities)
        variants = generate(
            x, p.true_label, error_type, labels=labels, reference=self.pool.reference,
            true_class_examples=self.pool.of_class(p.true_label),
            model=loaded[1] if loaded else None,
            rng=np.random.default_rng(_seed_of(p.correction_id)), config=self.counterexamples,
        )[:left]
        budget[p.source] = left - len(variants)
        return [{"dedup_key": f"counterexample:{p.correction_id}:{i}",
                 "origin": Origin.COUNTEREXAMPLE.value, "error_type": error_type,
                 "parent_prediction_id": p.prediction_id, "features": v.features,
                 "label": v.label, "weight": v.weight, "split": Split.TRAIN.value,
                 "source": p.source, "created_at": now} for i, v in enumerate(variants)]

    def _budget_left(self, session: Session, sources: set[str | None],
                     now: datetime) -> dict[str | None, int]:
        """Counterexamples each source may still add in the current window.

        Bounding amplification per source keeps one noisy (or hostile) client from
        flooding the training data with synthetic copies of its own corrections.
        """
        since = now - timedelta(seconds=self.settings.counterexample_window_s)
        used = dict(session.execute(
            select(Example.source, func.count())
            .where(Example.origin == Origin.COUNTEREXAMPLE.value, Example.created_at >= since,
                   Example.source.in_([s for s in sources if s is not None])
                   | Example.source.is_(None))
            .group_by(Example.source)).all())
        return {s: self.settings.counterexample_budget - used.get(s, 0) for s in sources}

    @staticmethod
    def _count(session: Session, outcomes: Counter) -> None:
        if not outcomes:
            return
        rows = [{"model_name": k[0], "model_version": k[1], "hour": k[2], "predicted": k[3],
                 "actual": k[4], "outcome": k[5], "count": n} for k, n in outcomes.items()]
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(ErrorCount)
        stmt = stmt.on_conflict_do_update(
            index_elements=["model_name", "model_version", "hour", "predicted", "actual",
                            "outcome"],
            set_={"count": ErrorCount.count + stmt.excluded.count})
        session.execute(stmt, rows)
