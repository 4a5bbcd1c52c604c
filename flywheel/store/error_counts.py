"""The hourly error counters, as the reports read them (the repository of `error_counts`).

Feedback workers add to the counters in their own transactions (`flywheel.feedback`,
the last write of each, in key order); what the counters mean for a version (error rate,
mix, confusions, accuracy over time) is the reader's. This module only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

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


def window_start(since: datetime) -> datetime:
    """The start of the hour that holds `since`: the first counter a window from `since`
    must include. Counters are per whole hour, so a window of the last hour read at 10:05
    needs the 09:00 counter (09:05–09:59 are in it); comparing counter hours with `since`
    itself left it out, and with it every correction of the last hour before 10:00.

    >>> window_start(datetime(2026, 5, 1, 10, 5, 30, tzinfo=UTC)).isoformat()
    '2026-05-01T10:00:00+00:00'
    """
    if since.tzinfo is not None:  # counters are UTC hours (an offset may not be whole hours)
        since = since.astimezone(UTC)
    return since.replace(minute=0, second=0, microsecond=0)


def error_counters(session: Session, model_name: str, since: datetime) -> list[CounterRow]:
    """Every counter of `model_name` from the hour of `since` on (`window_start`): a
    window covers whole hours, up to one more than asked, never less.

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
    ).where(ErrorCount.model_name == model_name, ErrorCount.hour >= window_start(since))
    return [CounterRow(*row) for row in session.execute(query).all()]
