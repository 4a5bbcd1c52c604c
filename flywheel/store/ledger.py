"""The privacy ledger's tables, read and written: the repository `flywheel.privacy` uses.

SQL only, in plain values (a mechanism is its (sample rate, σ, steps, kind)): what the numbers
mean, and the accounting over them, is the privacy component's. The guarantees the
privacy component argues rest on two properties kept here:
* `record` writes an update's entry and every source's spend in one transaction, before
  the update trains (so a crash can only over-count ε), and returns the new row's id;
* a row is never replaced nor deleted: a re-run of an update number adds a row, and the
  row of a learner that died before publishing keeps counting (over-count, never
  under-count); `set_version` labels exactly the row it is given, by id.

Why by id (issue 27): `record` used to replace an unversioned row of the same update
number and `set_version` matched on the update number, so two learners of one lineage
left promoted versions without a ledger row and 195 sources at ε = 3.71 against a budget
of 3 while the report said 2.998.

The writes take an optional `fence` (`flywheel.store.Lease`): checked in the write's own
transaction, so a learner that lost its lineage's lease writes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine

from flywheel.store.database import session_factory
from flywheel.store.lease import Lease
from flywheel.store.models import PrivacyLedgerEntry, PrivacySourceSpend

CHUNK = 500  # sources per IN (...) query

# (sample rate q, noise multiplier σ, steps, kind: "dp-sgd" or "tree")
MechanismValues = tuple[float, float, int, str]


@dataclass(frozen=True)
class LedgerRow:
    """One ledger entry as stored."""

    id: int
    lineage: str
    update_no: int
    version: str | None
    created_at: datetime
    accountant: str
    engine: str
    sample_rate: float
    noise_multiplier: float
    steps: int
    max_grad_norm: float
    delta: float
    epsilon_update: float
    epsilon_lineage: float
    sources: int
    examples: int
    public_examples: int
    capped_examples: int
    excluded_examples: int
    mechanism_kind: str = "dp-sgd"


@dataclass(frozen=True)
class SourceSpend:
    """Per source: ε so far (its latest cumulative value), updates, examples, versions."""

    source: str
    epsilon: float
    updates: int
    examples: int
    versions: tuple[str, ...]
    last_at: datetime | None = None  # when it last took part in an update


def _row(row: PrivacyLedgerEntry) -> LedgerRow:
    return LedgerRow(
        row.id,
        row.lineage,
        row.update_no,
        row.version,
        row.created_at,
        row.accountant,
        row.engine,
        row.sample_rate,
        row.noise_multiplier,
        row.steps,
        row.max_grad_norm,
        row.delta,
        row.epsilon_update,
        row.epsilon_lineage,
        row.sources,
        row.examples,
        row.public_examples,
        row.capped_examples,
        row.excluded_examples,
        row.mechanism_kind,
    )


class LedgerTables:
    """Reads and writes `privacy_ledger` and `privacy_source_spend`.

    >>> import tempfile
    >>> from flywheel.store import make_engine, upgrade
    >>> url = f"sqlite:///{tempfile.mkdtemp()}/ledger.db"
    >>> upgrade(url)
    >>> tables = LedgerTables(make_engine(url))
    >>> tables.lineage_epsilon("flywheel")
    0.0
    """

    def __init__(self, engine: Engine) -> None:
        self.sessions = session_factory(engine)

    def histories(
        self, lineage: str, sources: Iterable[str], since: datetime | None = None
    ) -> dict[str, list[MechanismValues]]:
        """The mechanisms each of `sources` took part in so far (absent: none); `since`:
        only those of entries written at or after it (a renewing budget's window)."""
        wanted = sorted(set(sources))
        out: dict[str, list[MechanismValues]] = defaultdict(list)
        with self.sessions() as session:
            for i in range(0, len(wanted), CHUNK):
                rows = session.execute(
                    select(
                        PrivacySourceSpend.source,
                        PrivacyLedgerEntry.sample_rate,
                        PrivacyLedgerEntry.noise_multiplier,
                        PrivacyLedgerEntry.steps,
                        PrivacyLedgerEntry.mechanism_kind,
                    )
                    .join(PrivacyLedgerEntry, PrivacyLedgerEntry.id == PrivacySourceSpend.ledger_id)
                    .where(
                        PrivacyLedgerEntry.lineage == lineage,
                        PrivacySourceSpend.source.in_(wanted[i : i + CHUNK]),
                        *([] if since is None else [PrivacyLedgerEntry.created_at >= since]),
                    )
                ).all()
                for source, q, sigma, steps, kind in rows:
                    out[source].append((q, sigma, steps, kind))
        return dict(out)

    def lineage_epsilon(self, lineage: str) -> float:
        with self.sessions() as session:
            value = session.execute(
                select(func.max(PrivacyLedgerEntry.epsilon_lineage)).where(
                    PrivacyLedgerEntry.lineage == lineage
                )
            ).scalar()
        return float(value or 0.0)

    def record(
        self,
        entry: Mapping[str, Any],
        spends: Mapping[str, tuple[int, float]],
        *,
        fence: Lease | None = None,
    ) -> int:
        """Write one update's entry and its sources (examples, ε after) atomically; the new
        row's id. Never replaces a row, whatever its update number."""
        with self.sessions.begin() as session:
            if fence is not None:
                fence.guard(session)
            row = PrivacyLedgerEntry(**entry)
            session.add(row)
            session.flush()
            session.add_all(
                PrivacySourceSpend(ledger_id=row.id, source=s, examples=n, epsilon=eps)
                for s, (n, eps) in spends.items()
            )
            return int(row.id)

    def set_version(self, row_id: int, version: str, *, fence: Lease | None = None) -> None:
        """Name the version published from row `row_id`; LookupError if there is no such row."""
        with self.sessions.begin() as session:
            if fence is not None:
                fence.guard(session)
            done = session.execute(
                update(PrivacyLedgerEntry)
                .where(PrivacyLedgerEntry.id == row_id)
                .values(version=version)
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            if done != 1:
                raise LookupError(f"no privacy ledger row {row_id} to name version {version}")

    def set_version_of_update(
        self, lineage: str, update_no: int, version: str, *, fence: Lease | None = None
    ) -> int | None:
        """For a version published before row ids were tagged on it: name it on the newest
        unversioned row of its update number; that row's id, or None if there is none."""
        with self.sessions.begin() as session:
            if fence is not None:
                fence.guard(session)
            row_id = session.execute(
                select(func.max(PrivacyLedgerEntry.id)).where(
                    PrivacyLedgerEntry.lineage == lineage,
                    PrivacyLedgerEntry.update_no == update_no,
                    PrivacyLedgerEntry.version.is_(None),
                )
            ).scalar()
            if row_id is None:
                return None
            session.execute(
                update(PrivacyLedgerEntry)
                .where(PrivacyLedgerEntry.id == row_id)
                .values(version=version)
                .execution_options(synchronize_session=False)
            )
            return int(row_id)

    def entries(self, lineage: str | None = None) -> list[LedgerRow]:
        query = select(PrivacyLedgerEntry).order_by(PrivacyLedgerEntry.id)
        if lineage is not None:
            query = query.where(PrivacyLedgerEntry.lineage == lineage)
        with self.sessions() as session:
            return [_row(r) for r in session.scalars(query)]

    def entry_for_version(self, version: str) -> LedgerRow | None:
        with self.sessions() as session:
            row = session.scalars(
                select(PrivacyLedgerEntry).where(PrivacyLedgerEntry.version == version)
            ).first()
            return None if row is None else _row(row)

    def sources(self, lineage: str | None = None) -> list[SourceSpend]:
        """Every source's spend, the most spent first."""
        query = (
            select(
                PrivacySourceSpend.source,
                PrivacySourceSpend.epsilon,
                PrivacySourceSpend.examples,
                PrivacyLedgerEntry.version,
                PrivacyLedgerEntry.created_at,
            )
            .join(PrivacyLedgerEntry, PrivacyLedgerEntry.id == PrivacySourceSpend.ledger_id)
            .order_by(PrivacyLedgerEntry.id)
        )
        if lineage is not None:
            query = query.where(PrivacyLedgerEntry.lineage == lineage)
        acc: dict[str, dict[str, Any]] = {}
        with self.sessions() as session:
            for source, eps, n, version, at in session.execute(query):
                a = acc.setdefault(
                    source, {"eps": 0.0, "updates": 0, "examples": 0, "versions": [], "at": at}
                )
                a["at"] = max(a["at"], at)
                a["eps"] = max(a["eps"], eps)
                a["updates"] += 1
                a["examples"] += n
                if version:
                    a["versions"].append(version)
        return sorted(
            (
                SourceSpend(s, a["eps"], a["updates"], a["examples"], tuple(a["versions"]), a["at"])
                for s, a in acc.items()
            ),
            key=lambda s: (-s.epsilon, s.source),
        )
