"""The hourly error counters, as the reports read them (the repository of `error_counts`).

Feedback workers add to the counters in their own transactions (`flywheel.feedback`,
the last write of each, in key order); what the counters mean for a version (error rate,
mix, confusions, accuracy over time) is the reader's. This module only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.store.models import ErrorCount


@dataclass(frozen=True)
class CounterRow:
    """One counter: corrections of one version in one hour with one outcome and pair."""

    model_version: str
    hour: datetime
    predicted: str
    actual: str
    outcome: str
    count: int


def error_counters(session: Session, model_name: str, since: datetime) -> list[CounterRow]:
    """Every counter of `model_name` from the hour of `since` on.

    >>> import tempfile
    >>> from datetime import UTC
    >>> from flywheel.store import make_engine, session_factory, upgrade
    >>> url = f"sqlite:///{tempfile.mkdtemp()}/counts.db"
    >>> upgrade(url)
    >>> with session_factory(make_engine(url))() as session:
    ...     error_counters(session, "flywheel", datetime(2026, 1, 1, tzinfo=UTC))
    []
    """
    query = select(
        ErrorCount.model_version,
        ErrorCount.hour,
        ErrorCount.predicted,
        ErrorCount.actual,
        ErrorCount.outcome,
        ErrorCount.count,
    ).where(ErrorCount.model_name == model_name, ErrorCount.hour >= since)
    return [CounterRow(*row) for row in session.execute(query).all()]
