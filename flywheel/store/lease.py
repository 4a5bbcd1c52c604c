"""One writer per learner lineage: a lease in the store with a fencing token.

A row per lineage holds its holder (`owner`), when the lease runs out (`expires_at`) and a
fencing token that grows by one at every change of holder. Taking the lease is one
conditional UPDATE (`WHERE expires_at < now`), so of two learners at most one gets it, on
PostgreSQL and SQLite alike (no advisory locks). Every write the learner makes runs
`Lease.guard(session)` in its own transaction first: a conditional UPDATE on
`(lineage, token)` that also renews the lease; it matches nothing once a newer holder
exists, and the write is refused with `LeaseLost` before it happens. On PostgreSQL the
guard's row lock is held until the write commits, so a takeover cannot slip between the
check and the write; SQLite serialises writers anyway.

Times are seconds since the epoch on the database's clock, the one clock every holder
shares (hosts' clocks may disagree by more than a lease lasts).

Why (issue 27, measured on the code before it): two `flywheel learn` of one lineage
trained 535 examples twice and left two promoted versions without a ledger row.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Float, cast, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from flywheel.store.database import session_factory
from flywheel.store.models import LearnerLease

__all__ = ["Holder", "Lease", "LeaseLost", "LeaseTable", "default_owner"]


class LeaseLost(RuntimeError):
    """A newer holder took the lineage's lease: this writer must stop writing for it."""


def default_owner() -> str:
    """host:pid:random, unique per process start (a restarted pid is another owner)."""
    return f"{socket.gethostname()[:150]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # fits 200


@dataclass(frozen=True)
class Holder:
    """Who holds a lineage's lease, as stored."""

    lineage: str
    owner: str
    token: int
    expires_in_s: float  # seconds left on the database's clock (negative: ran out)


def _now(dialect: str) -> ColumnElement[float]:
    """Now, in seconds since the epoch, on the database's clock."""
    if dialect == "postgresql":  # clock_timestamp: the real time, not the transaction's start
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    return (func.julianday("now") - 2440587.5) * 86400.0  # SQLite, millisecond resolution


class Lease:
    """A held lease: its token fences every write (`guard`, `check`)."""

    def __init__(self, table: LeaseTable, lineage: str, owner: str, token: int) -> None:
        self.table, self.lineage, self.owner, self.token = table, lineage, owner, token

    def __repr__(self) -> str:
        return f"Lease({self.lineage!r}, owner={self.owner!r}, token={self.token})"

    def guard(self, session: Session) -> None:
        """In `session`'s transaction, before its write: renew this lease, or LeaseLost.

        The UPDATE matches only while this token is the lineage's: a lease that ran out
        but was not taken is still this holder's (no other learner can have written) and
        is renewed. It locks the row (PostgreSQL) until the caller's transaction ends, so
        a takeover waits for the write and then finds the lease renewed.
        """
        now = _now(self.table.dialect)
        result = session.execute(
            update(LearnerLease)
            .where(LearnerLease.lineage == self.lineage, LearnerLease.token == self.token)
            .values(expires_at=now + self.table.ttl_s, renewed_at=now)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            holder = self.table.holder(self.lineage, session)
            raise LeaseLost(
                f"the lease of {self.lineage} (token {self.token}) is "
                + (
                    "gone"
                    if holder is None
                    else f"held by {holder.owner} under token {holder.token}"
                )
            )

    def check(self) -> None:
        """Renew and check in a transaction of its own: right before a write outside the
        store (an MLflow publish or alias move), which then fails closed on LeaseLost."""
        with self.table.sessions.begin() as session:
            self.guard(session)

    def renew(self) -> None:
        """The background renewal: the same as `check`."""
        self.check()

    def release(self) -> None:
        """Let the lease run out now (a clean stop): a standby takes over at its next try.
        Does nothing if this token no longer holds it."""
        with self.table.sessions.begin() as session:
            now = _now(self.table.dialect)
            session.execute(
                update(LearnerLease)
                .where(LearnerLease.lineage == self.lineage, LearnerLease.token == self.token)
                .values(expires_at=now - 1.0)
                .execution_options(synchronize_session=False)
            )


class LeaseTable:
    """Takes, reads and fences the leases of `learner_leases`.

    >>> import tempfile
    >>> from flywheel.store import make_engine, upgrade
    >>> url = f"sqlite:///{tempfile.mkdtemp()}/lease.db"
    >>> upgrade(url)
    >>> table = LeaseTable(make_engine(url), ttl_s=10.0)
    >>> a, b = table.try_acquire("m:online", "a"), table.try_acquire("m:online", "b")
    >>> a.token, b
    (1, None)
    """

    def __init__(self, engine: Engine, *, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"a lease must last > 0 s, got {ttl_s}")
        self.sessions = session_factory(engine)
        self.dialect = engine.dialect.name
        self.ttl_s = float(ttl_s)

    def try_acquire(self, lineage: str, owner: str) -> Lease | None:
        """The lease, under a new token, if nobody holds it (or its holder's ran out);
        None while another holder's lease runs."""
        with self.sessions.begin() as session:
            now = _now(self.dialect)
            values = {
                "lineage": lineage,
                "owner": owner,
                "token": 1,
                "expires_at": now + self.ttl_s,
                "renewed_at": now,
            }
            if self.dialect not in ("postgresql", "sqlite"):
                raise ValueError(f"leases need PostgreSQL or SQLite, not {self.dialect}")
            dialect = postgresql if self.dialect == "postgresql" else sqlite
            # RETURNING, not rowcount: psycopg reports a row for a conflict that did nothing
            created = session.execute(
                dialect.insert(LearnerLease)
                .values(values)
                .on_conflict_do_nothing()
                .returning(LearnerLease.token)
            ).first()
            if created is None:
                taken = session.execute(
                    update(LearnerLease)
                    .where(LearnerLease.lineage == lineage, LearnerLease.expires_at < now)
                    .values(
                        owner=owner,
                        token=LearnerLease.token + 1,
                        expires_at=now + self.ttl_s,
                        renewed_at=now,
                    )
                    .execution_options(synchronize_session=False)
                ).rowcount  # type: ignore[attr-defined]
                if not taken:
                    return None
            token = session.execute(
                select(LearnerLease.token).where(LearnerLease.lineage == lineage)
            ).scalar_one()
            return Lease(self, lineage, owner, int(token))

    def holder(self, lineage: str, session: Session | None = None) -> Holder | None:
        """Who holds (or last held) `lineage`'s lease; None if nobody ever did."""
        query = select(
            LearnerLease.owner,
            LearnerLease.token,
            LearnerLease.expires_at - _now(self.dialect),
        ).where(LearnerLease.lineage == lineage)
        if session is None:
            with self.sessions() as own:
                row = own.execute(query).first()
        else:
            row = session.execute(query).first()
        return None if row is None else Holder(lineage, row[0], int(row[1]), float(row[2]))
