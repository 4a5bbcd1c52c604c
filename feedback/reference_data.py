"""The labelled data the analyzer compares against: seed examples, reference statistics,
and an in-memory pool of labelled examples for neighbours and interpolation targets."""

from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.feedback.reference import ReferenceStats
from flywheel.feedback.store import Example, Origin, Split, insert_ignoring_duplicates
from flywheel.feedback.store.models import ReferenceStats as ReferenceStatsRow
from flywheel.settings import Settings


def ensure_reference(session: Session, settings: Settings) -> ReferenceStats:
    """Seed examples (train + trusted holdout) and reference statistics, written once.

    Seed data is regenerated from the settings' seed, exactly as the initial model was
    trained on it, so every worker and the learner agree on it.
    """
    row = session.get(ReferenceStatsRow, settings.model_name)
    if row is not None:
        return ReferenceStats.from_dict(row.stats)
    from flywheel.learner import seed_data
    from flywheel.streams import LABELS

    x_tr, y_tr, x_ho, y_ho = seed_data(settings)
    rows = []
    for split, xs, ys in ((Split.TRAIN, x_tr, y_tr), (Split.HOLDOUT, x_ho, y_ho)):
        rows += [{"dedup_key": f"seed:{settings.model_name}:{split.value}:{i}",
                  "origin": Origin.SEED.value, "features": x.tolist(), "label": LABELS[y],
                  "weight": 1.0, "split": split.value}
                 for i, (x, y) in enumerate(zip(xs, ys, strict=True))]
    insert_ignoring_duplicates(session, Example, rows)
    reference = ReferenceStats.from_examples(x_tr.astype(np.float64))
    insert_ignoring_duplicates(session, ReferenceStatsRow, [
        {"model_name": settings.model_name, "stats": reference.to_dict(),
         "example_count": len(x_tr)}])
    winner = session.get(ReferenceStatsRow, settings.model_name)  # a racing worker's
    return ReferenceStats.from_dict(winner.stats) if winner else reference


class LabelledPool:
    """Trusted labelled examples in memory, for neighbours and interpolation targets.

    Only seed examples, loaded once: analysis must not depend on which corrections a worker
    happened to see first, or a crashed-and-replayed batch would be judged differently
    from an uninterrupted run. (Releasing quarantined corrections that other corrections
    corroborate is a store-level step, not a change to this pool.)
    """

    def __init__(self, reference: ReferenceStats, capacity: int = 20_000) -> None:
        self.reference = reference
        self.capacity = capacity
        self._x = np.empty((0, reference.input_dim), dtype=np.float64)
        self._labels: list[str] = []

    @classmethod
    def load(cls, session: Session, reference: ReferenceStats,
             capacity: int = 20_000) -> LabelledPool:
        pool = cls(reference, capacity)
        rows = session.execute(
            select(Example.features, Example.label)
            .where(Example.split == Split.TRAIN.value, Example.origin == Origin.SEED.value)
            .order_by(Example.id.desc()).limit(capacity)).all()
        pool.add([r[0] for r in reversed(rows)], [r[1] for r in reversed(rows)])
        return pool

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, features: list[list[float]], labels: list[str]) -> None:
        if not labels:
            return
        self._x = np.vstack([self._x, np.asarray(features, dtype=np.float64)])[-self.capacity:]
        self._labels = (self._labels + list(labels))[-self.capacity:]

    def near(self, x: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
        """The `k` nearest examples in standardized space (the analyzer applies its radius)."""
        if not self._labels:
            return self._x, []
        d = np.linalg.norm((self._x - x) / self.reference.std, axis=1)
        idx = np.argsort(d)[:k]
        return self._x[idx], [self._labels[i] for i in idx]

    def of_class(self, label: str, limit: int = 256) -> np.ndarray:
        idx = [i for i, lab in enumerate(self._labels) if lab == label][-limit:]
        return self._x[idx]
