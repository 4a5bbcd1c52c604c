"""The examples table as the learner and review read it, and the learner's saved state.

A repository: SQL over `examples` and `learner_state` in, plain rows (`StoredExample`)
out. How a cursor decides what is unread, and what the rows are used for, is the
learner's (`flywheel.learner.ExampleSource` builds on this).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, not_, select
from sqlalchemy.engine import Engine

from flywheel.store.database import session_factory
from flywheel.store.lease import Lease
from flywheel.store.models import Example, LearnerState, Origin, Split

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
    Example.privacy_unit,
)


@dataclass(frozen=True)
class StoredExample:
    """One stored example, as read back."""

    id: int
    origin: str
    split: str
    features: list[float]
    label: str
    weight: float
    error_type: str | None
    source: str | None = None
    parent_prediction_id: str | None = None
    privacy_unit: str | None = None

    @property
    def contributor(self) -> str:
        """Whose data this is, for privacy: the privacy unit stored with it (its data
        subject, else the prediction it corrects: `flywheel.subjects.privacy_unit`).

        Rows stored before migration 0013 have none: their unit stays what it was when
        their ε was written to the ledger, the whole source (`shop/u-17`), else the
        correction they came from, so an old ledger keeps counting for the same keys."""
        if self.privacy_unit:
            return self.privacy_unit
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


def _rows_of(result: Iterable[Sequence[Any]]) -> list[StoredExample]:
    return [
        StoredExample(r[0], r[1], r[2], r[3], r[4], float(r[5]), r[6], r[7], r[8], r[9])
        for r in result
    ]


class ExampleReader:
    """Reads examples and the learner's saved state from one store.

    >>> import tempfile
    >>> from flywheel.store import make_engine, upgrade
    >>> url = f"sqlite:///{tempfile.mkdtemp()}/examples.db"
    >>> upgrade(url)
    >>> reader = ExampleReader(make_engine(url))
    >>> reader.unread(0, [], limit=10), reader.load_state("flywheel")
    ([], None)
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = session_factory(engine)

    def unread(self, watermark: int, above: list[list[int]], limit: int) -> list[StoredExample]:
        """Non-seed examples (any split) above `watermark` and outside the inclusive
        ranges `above`, in id order, at most `limit`."""
        where = [Example.id > watermark, Example.origin != Origin.SEED.value]
        where += [not_(Example.id.between(lo, hi)) for lo, hi in above]
        query = select(*_COLUMNS).where(and_(*where)).order_by(Example.id).limit(limit)
        with self.sessions() as session:
            return _rows_of(session.execute(query).all())

    def by_ids(self, ids: Iterable[int]) -> list[StoredExample]:
        """The examples with these ids that still exist."""
        wanted = list(ids)
        if not wanted:
            return []
        with self.sessions() as session:
            return _rows_of(session.execute(select(*_COLUMNS).where(Example.id.in_(wanted))).all())

    def counts(self, lo: int, hi: int) -> list[tuple[str, str, int]]:
        """(origin, split, examples) of the examples with ids in [lo, hi]."""
        query = (
            select(Example.origin, Example.split, func.count())
            .where(Example.id.between(lo, hi))
            .group_by(Example.origin, Example.split)
        )
        with self.sessions() as session:
            return [(origin, split, int(n)) for origin, split, n in session.execute(query)]

    def recent_holdout(self, n: int) -> list[StoredExample]:
        """The newest `n` corrections kept out of training."""
        with self.sessions() as session:
            return _rows_of(
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
            return _rows_of(
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
            rows = _rows_of(
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

    def save_state(
        self, lineage: str, state: dict, cursor: int, *, fence: Lease | None = None
    ) -> None:
        """Write the learner's state; `fence`: refused (LeaseLost) unless it holds `lineage`."""
        with self.sessions.begin() as session:
            if fence is not None:
                fence.guard(session)
            row = session.get(LearnerState, lineage)
            if row is None:
                session.add(LearnerState(lineage=lineage, cursor=cursor, state=state))
            else:
                row.cursor, row.state = cursor, state
