"""What the learner reads from the training store, and where it keeps its cursor."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import and_, func, not_, select
from sqlalchemy.engine import Engine

from flywheel.learner.cursor import CursorState
from flywheel.store import Example, LearnerState, Origin, Split, session_factory

_COLUMNS = (
    Example.id,
    Example.origin,
    Example.split,
    Example.features,
    Example.label,
    Example.weight,
    Example.error_type,
    Example.source,
    Example.parent_prediction_id,
)


@dataclass(frozen=True)
class StoredExample:
    id: int
    origin: str
    split: str
    features: list[float]
    label: str
    weight: float
    error_type: str | None
    source: str | None = None
    parent_prediction_id: str | None = None

    @property
    def contributor(self) -> str:
        """Whose data this is, for privacy: the source, else the correction it came from."""
        if self.source:
            return f"source:{self.source}"
        if self.parent_prediction_id:
            return f"prediction:{self.parent_prediction_id}"
        return f"example:{self.id}"

    @property
    def trainable(self) -> bool:
        return self.split == Split.TRAIN.value

    @property
    def quarantined(self) -> bool:
        return self.split == Split.QUARANTINE.value

    @property
    def is_correction(self) -> bool:
        return self.origin == Origin.CORRECTION.value


def _rows(result: Iterable[Sequence[Any]]) -> list[StoredExample]:
    return [
        StoredExample(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6], r[7], r[8]) for r in result
    ]


class ExampleSource:
    """Reads examples past a cursor, recent holdout corrections and replay samples."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = session_factory(engine)

    def read_new(self, cursor: CursorState, limit: int) -> list[StoredExample]:
        """Unread non-seed examples in id order (any split), at most `limit`."""
        where = [Example.id > cursor.watermark, Example.origin != Origin.SEED.value]
        where += [not_(Example.id.between(lo, hi)) for lo, hi in cursor.above]
        query = select(*_COLUMNS).where(and_(*where)).order_by(Example.id).limit(limit)
        with self.sessions() as session:
            return _rows(session.execute(query).all())

    def released(self, cursor: CursorState) -> tuple[list[StoredExample], list[int]]:
        """Held examples now trainable, and held ids never to train on (released to another
        split, or deleted): those can be forgotten; the trainable ones once they are used."""
        if not cursor.held:
            return [], []
        with self.sessions() as session:
            rows = _rows(
                session.execute(select(*_COLUMNS).where(Example.id.in_(cursor.held))).all()
            )
        elsewhere = [r.id for r in rows if not r.trainable and not r.quarantined]
        gone = set(cursor.held) - {r.id for r in rows}
        return [r for r in rows if r.trainable], elsewhere + sorted(gone)

    def recent_holdout(self, n: int) -> list[StoredExample]:
        """The newest `n` corrections kept out of training."""
        with self.sessions() as session:
            return _rows(
                session.execute(
                    select(*_COLUMNS)
                    .where(
                        Example.split == Split.HOLDOUT.value,
                        Example.origin == Origin.CORRECTION.value,
                    )
                    .order_by(Example.id.desc())
                    .limit(n)
                ).all()
            )

    def replay_sample(self, up_to_id: int, n: int) -> list[StoredExample]:
        """A random sample of trainable examples already consumed (refills replay on start)."""
        with self.sessions() as session:
            return _rows(
                session.execute(
                    select(*_COLUMNS)
                    .where(Example.split == Split.TRAIN.value, Example.id <= up_to_id)
                    .order_by(func.random())
                    .limit(n)
                ).all()
            )

    def newest_trainable(self, n: int) -> list[StoredExample]:
        """The newest `n` trainable non-seed examples, oldest first (a federated site's data)."""
        with self.sessions() as session:
            rows = _rows(
                session.execute(
                    select(*_COLUMNS)
                    .where(Example.split == Split.TRAIN.value, Example.origin != Origin.SEED.value)
                    .order_by(Example.id.desc())
                    .limit(n)
                ).all()
            )
        return rows[::-1]

    def load_state(self, lineage: str) -> dict | None:
        with self.sessions() as session:
            row = session.get(LearnerState, lineage)
            return None if row is None else dict(row.state or {})

    def save_state(self, lineage: str, state: dict, cursor: int) -> None:
        with self.sessions.begin() as session:
            row = session.get(LearnerState, lineage)
            if row is None:
                session.add(LearnerState(lineage=lineage, cursor=cursor, state=state))
            else:
                row.cursor, row.state = cursor, state


def bound_per_contributor(
    rows: list[StoredExample], limit: int | None
) -> tuple[dict[str, list[StoredExample]], int]:
    """Rows grouped by contributor, the first `limit` of each in the given order, and how
    many were cut: the contribution bound DP relies on (online and federated alike)."""
    groups: dict[str, list[StoredExample]] = {}
    for row in rows:
        groups.setdefault(row.contributor, []).append(row)
    if limit is None:
        return groups, 0
    cut = sum(max(0, len(g) - limit) for g in groups.values())
    return {c: g[:limit] for c, g in groups.items()}, cut


def as_arrays(
    rows: list[StoredExample], label_index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, label indices and weights; rows with a label the model lacks are dropped."""
    keep = [r for r in rows if r.label in label_index]
    if not keep:
        return (np.empty((0, 0), np.float32), np.empty(0, np.int64), np.empty(0, np.float32))
    x = np.asarray([r.features for r in keep], dtype=np.float32)
    y = np.asarray([label_index[r.label] for r in keep], dtype=np.int64)
    w = np.asarray([r.weight for r in keep], dtype=np.float32)
    return x, y, w
