"""How far each learner lineage has read the training store (`flywheel status`).

`learner_state.cursor` is the lineage's watermark: every example id at or below it has
been read. Examples above it that are trainable may still be waiting, or may have been
read already out of order (the cursor's ranges above the watermark, in its JSON state):
`unread_at_most` counts them all, an upper bound that is exact once the learner is idle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flywheel.store.models import Example, LearnerState, Origin, Split


@dataclass(frozen=True)
class LearnerProgress:
    """One lineage's read position: watermark, trainable examples above it, last save."""

    lineage: str
    watermark: int
    unread_at_most: int
    updated_at: datetime | None


def learner_progress(session: Session) -> list[LearnerProgress]:
    """Every lineage in the store, by name.

    >>> import tempfile
    >>> from flywheel.store import make_engine, session_factory, upgrade
    >>> url = f"sqlite:///{tempfile.mkdtemp()}/progress.db"
    >>> upgrade(url)
    >>> with session_factory(make_engine(url))() as session:
    ...     learner_progress(session)
    []
    """
    rows = session.execute(
        select(LearnerState.lineage, LearnerState.cursor, LearnerState.updated_at).order_by(
            LearnerState.lineage
        )
    ).all()
    out = []
    for lineage, cursor, updated_at in rows:
        unread = session.scalar(
            select(func.count())
            .select_from(Example)
            .where(
                Example.id > cursor,
                Example.split == Split.TRAIN.value,
                Example.origin != Origin.SEED.value,
            )
        )
        out.append(LearnerProgress(lineage, int(cursor), int(unread or 0), updated_at))
    return out


__all__ = ["LearnerProgress", "learner_progress"]
