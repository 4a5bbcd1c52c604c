"""Retention: what the store forgets, and when (`flywheel db maintain`, the feedback workers).

Each table has a stated retention (defaults and the storage they imply: docs/contracts.md,
"Retention"):
- `predictions`: `predictions_s` after their timestamp (default the correction window,
  FLYWHEEL_CORRECTION_EXPIRY_S, plus a day). A prediction is only read again to join a
  correction; the reports and monitors read the hourly `error_counts`, never predictions.
  On PostgreSQL whole day partitions go (`flywheel.store.partitions`): a row is kept at
  least `predictions_s` and at most a day more; SQLite deletes the rows.
- `corrections`: joined or expired ones `corrections_s` after their timestamp. A pending
  correction is never deleted (it expires first: `corrections_s` must exceed the expiry).
  A correction's row is what makes a redelivery of it a no-op, so this must outlast the
  corrections topic's retention on the broker (docs/contracts.md says so).
- `scores` (issue 28): with the predictions they score, `predictions_s` after their own
  timestamp -- a score is read again only when its prediction's correction joins, which
  cannot happen once the prediction is gone.
- `outcomes` (issue 28): with the corrections that labelled them, `corrections_s` after
  `labelled_at` (the live decisions and the monitor read recent outcomes only).
- `examples`: the ones born from traffic (every origin but `seed`) `examples_s` after they
  were written; the trusted set's `seed` rows stay while the lineage does.
- `error_counts`: hourly counters `error_counts_s` after their hour (the reports' and the
  model cards' windows are far shorter).
- `counterexample_usage`: minutes older than the budget window, which nothing reads.
- `privacy_ledger`, `privacy_source_spend`: never by time. ε is cumulative over a lineage,
  every version it published is described by the rows before it, and the privacy report
  sums them: dropping old rows would understate what was spent.

`delete_rows` is the one delete path (erasure of a data subject will use it too): a DELETE
on the parent table reaches every partition.

Runs are claimed in the store, not per process: a row in `learner_leases` under
`MAINTENANCE_LEASE` holds when the next run is due. Claiming it is one conditional UPDATE
(`expires_at < now`), which PostgreSQL re-checks after a concurrent claim commits, so of
several workers one runs per interval and the others skip at the cost of one statement;
`flywheel db maintain` claims it unconditionally (it waits for a run in progress).
"""

from __future__ import annotations

import logging
import time as clock
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, Engine, delete, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from flywheel.store.database import session_factory
from flywheel.store.models import (
    Base,
    Correction,
    CorrectionStatus,
    CounterexampleUsage,
    ErrorCount,
    Example,
    LearnerLease,
    Origin,
    Outcome,
    Prediction,
    Score,
)
from flywheel.store.partitions import (
    PARTITIONED,
    drop_partitions_before,
    ensure_partitions,
    is_partitioned,
)

if TYPE_CHECKING:
    from flywheel.settings import FeedbackSettings

log = logging.getLogger(__name__)
MAINTENANCE_LEASE = "flywheel:store-maintenance"  # ':' is in no model name (a lineage)
LOCK_WAIT_S = 5.0  # longest a partition change waits for its table (see _bounded_lock_wait)


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each table keeps its rows (seconds), and how many days of partitions are
    made ahead. `RetentionPolicy.of(feedback_settings)` reads FLYWHEEL_RETENTION_*."""

    predictions_s: float
    corrections_s: float
    examples_s: float
    error_counts_s: float
    usage_s: float  # counterexample_usage: the budget window
    partitions_ahead: int = 3
    every_s: float = 3600.0  # how often the workers run it (0: never)

    @classmethod
    def of(cls, feedback: FeedbackSettings) -> RetentionPolicy:
        """From the feedback settings: FLYWHEEL_RETENTION_* and the budget window."""
        return cls(
            predictions_s=feedback.retention_predictions_s,
            corrections_s=feedback.retention_corrections_s,
            examples_s=feedback.retention_examples_s,
            error_counts_s=feedback.retention_error_counts_s,
            usage_s=feedback.counterexample_window_s,
            partitions_ahead=feedback.retention_partitions_ahead,
            every_s=feedback.retention_every_s,
        )


@dataclass
class MaintenanceReport:
    """What one run did: rows removed per table, partitions dropped and created."""

    removed: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    seconds: float = 0.0


def delete_rows(session: Session, model: type[Base], *where: ColumnElement[bool]) -> int:
    """Delete `model`'s rows matching every condition, across partitions; how many."""
    result = session.execute(
        delete(model).where(*where).execution_options(synchronize_session=False)
    )
    assert isinstance(result, CursorResult)  # a DELETE's (Session.execute is typed Result)
    return result.rowcount or 0


def _ago(now: datetime, seconds: float) -> datetime:
    return now - timedelta(seconds=seconds)


def _bounded_lock_wait(session: Session) -> None:
    """A partition's DETACH/ATTACH needs its table to itself for a moment; while it waits
    for a long transaction, every write queues behind it. Past LOCK_WAIT the run fails
    (tried again at the next interval) instead of stalling the workers' writes longer."""
    session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_S * 1000:.0f}ms'"))


def apply_retention(
    sessions: sessionmaker[Session], policy: RetentionPolicy, now: datetime
) -> MaintenanceReport:
    """Create the partitions ahead, then remove what is past each table's retention; each
    table in a transaction of its own (a partition's DETACH locks its parent table only
    for that short transaction)."""
    started = clock.perf_counter()
    report = MaintenanceReport()
    with sessions.begin() as session:
        partitioned = {t for t in PARTITIONED if is_partitioned(session, t)}
    today = now.astimezone(UTC).date()
    for table in sorted(partitioned):
        with sessions.begin() as session:
            _bounded_lock_wait(session)
            report.created += ensure_partitions(
                session, table, today + timedelta(days=policy.partitions_ahead)
            )
    cutoff = _ago(now, policy.predictions_s)
    with sessions.begin() as session:
        if "predictions" in partitioned:
            _bounded_lock_wait(session)
            dropped, rows = drop_partitions_before(session, "predictions", cutoff)
            report.dropped += dropped
        else:
            rows = delete_rows(session, Prediction, Prediction.created_at < cutoff)
        report.removed["predictions"] = rows
    done = (CorrectionStatus.JOINED.value, CorrectionStatus.EXPIRED.value)
    steps: list[tuple[str, type[Base], list[ColumnElement[bool]]]] = [
        ("scores", Score, [Score.created_at < cutoff]),
        ("outcomes", Outcome, [Outcome.labelled_at < _ago(now, policy.corrections_s)]),
        (
            "corrections",
            Correction,
            [
                Correction.status.in_(done),
                Correction.created_at < _ago(now, policy.corrections_s),
            ],
        ),
        (
            "examples",
            Example,
            [
                Example.origin != Origin.SEED.value,
                Example.created_at < _ago(now, policy.examples_s),
            ],
        ),
        ("error_counts", ErrorCount, [ErrorCount.hour < _ago(now, policy.error_counts_s)]),
        (
            "counterexample_usage",
            CounterexampleUsage,
            [CounterexampleUsage.minute < _ago(now, policy.usage_s + 60.0)],
        ),
    ]
    for name, model, where in steps:
        with sessions.begin() as session:
            report.removed[name] = delete_rows(session, model, *where)
    report.seconds = clock.perf_counter() - started
    return report


def claim_run(session: Session, owner: str, now: datetime, every_s: float, force: bool) -> bool:
    """Claim the store's maintenance run in `session`'s transaction: True if this caller
    runs it now (the run was due, or `force`), and the next one is due `every_s` later."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stamp = now.timestamp()
    session.execute(
        dialect.insert(LearnerLease)
        .values(lineage=MAINTENANCE_LEASE, owner=owner, token=0, expires_at=0.0, renewed_at=stamp)
        .on_conflict_do_nothing()
    )
    claim = update(LearnerLease).where(LearnerLease.lineage == MAINTENANCE_LEASE)
    if not force:
        claim = claim.where(LearnerLease.expires_at <= stamp)
    won = session.execute(
        claim.values(
            owner=owner,
            token=LearnerLease.token + 1,
            expires_at=stamp + every_s,
            renewed_at=stamp,
        )
        .returning(LearnerLease.token)
        .execution_options(synchronize_session=False)
    ).first()
    return won is not None


def maintain(
    engine: Engine,
    policy: RetentionPolicy,
    *,
    owner: str,
    now: datetime | None = None,
    force: bool = False,
) -> MaintenanceReport | None:
    """Run retention and partition upkeep if it is due (or `force`); None if another
    process ran it less than `policy.every_s` ago."""
    now = now or datetime.now(UTC)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        if not claim_run(session, owner, now, max(policy.every_s, 1.0), force):
            return None
    report = apply_retention(sessions, policy, now)
    log.info(
        "store maintenance: removed %s, dropped %d partitions, created %d, in %.2f s",
        report.removed,
        len(report.dropped),
        len(report.created),
        report.seconds,
    )
    return report


__all__ = [
    "MAINTENANCE_LEASE",
    "MaintenanceReport",
    "RetentionPolicy",
    "apply_retention",
    "claim_run",
    "delete_rows",
    "maintain",
]
