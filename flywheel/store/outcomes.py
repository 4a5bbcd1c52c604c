"""Paired counts of two versions' live outcomes: what a sequential decision reads (issue 28).

Two versions are compared only on the labelled predictions both scored (the `outcomes`
rows of the same prediction), so whatever the traffic mix, the comparison is of the two
models on the same requests. The counts are all a McNemar-style paired test needs:
`flywheel.sequential.PairedTest` is a function of them, so reading them again after every
label is the same as updating a test label by label.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, aliased

from flywheel.store.models import Outcome

__all__ = ["PairedCounts", "paired_counts"]


@dataclass(frozen=True)
class PairedCounts:
    """Labelled predictions both versions scored, split by which of them was right."""

    labels: int = 0
    a_only: int = 0  # only version a was right
    b_only: int = 0  # only version b was right
    both: int = 0  # both were right
    a_log_loss: float = 0.0  # summed over the paired labels
    b_log_loss: float = 0.0

    @property
    def neither(self) -> int:
        return self.labels - self.a_only - self.b_only - self.both


def paired_counts(
    session: Session, model_name: str, a: str, b: str, *, since: datetime | None = None
) -> PairedCounts:
    """The paired outcomes of versions `a` and `b` of `model_name` (labelled at or after
    `since`, if given).

    >>> import math
    >>> from datetime import UTC, datetime
    >>> from sqlalchemy import create_engine
    >>> from sqlalchemy.orm import Session
    >>> from flywheel.store.models import Base, Outcome
    >>> engine = create_engine("sqlite://")
    >>> Base.metadata.create_all(engine, tables=[Outcome.__table__])
    >>> t = datetime(2026, 1, 1, tzinfo=UTC)
    >>> def row(pid, version, correct):
    ...     return Outcome(prediction_id=pid, model_version=version, model_name="m",
    ...         answered=version == "1", label="y", predicted="y" if correct else "n",
    ...         correct=correct, p_true=0.9 if correct else 0.2, confidence=0.9,
    ...         log_loss=-math.log(0.9 if correct else 0.2),
    ...         predicted_at=t, labelled_at=t)
    >>> with Session(engine) as s:
    ...     s.add_all([row("p1", "1", True), row("p1", "2", False), row("p2", "1", True),
    ...         row("p2", "2", True), row("p3", "1", False)])  # p3: only v1 scored it
    ...     s.commit()
    ...     paired_counts(s, "m", "1", "2")
    PairedCounts(labels=2, a_only=1, b_only=0, both=1, a_log_loss=0.21..., b_log_loss=1.71...)
    """
    oa, ob = aliased(Outcome), aliased(Outcome)
    conditions = [oa.model_name == model_name, oa.model_version == a]
    if since is not None:
        conditions.append(oa.labelled_at >= since)
    a_only = and_(oa.correct, ~ob.correct)
    b_only = and_(ob.correct, ~oa.correct)
    both = and_(oa.correct, ob.correct)
    row = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((a_only, 1), else_=0)), 0),
            func.coalesce(func.sum(case((b_only, 1), else_=0)), 0),
            func.coalesce(func.sum(case((both, 1), else_=0)), 0),
            func.coalesce(func.sum(oa.log_loss), 0.0),
            func.coalesce(func.sum(ob.log_loss), 0.0),
        )
        .select_from(oa)
        .join(
            ob,
            and_(
                ob.prediction_id == oa.prediction_id,
                ob.model_name == model_name,
                ob.model_version == b,
            ),
        )
        .where(*conditions)
    ).one()
    labels, a_only, b_only, both, a_loss, b_loss = row
    return PairedCounts(
        int(labels), int(a_only), int(b_only), int(both), float(a_loss), float(b_loss)
    )
