"""The privacy ledger's tables, read and written: the repository `flywheel.privacy` uses.

SQL only, in plain values (a mechanism is its (sample rate, σ, steps)): what the numbers
mean, and the accounting over them, is the privacy component's. The guarantees the
privacy component argues rest on two properties kept here:
* `record` writes an update's entry and every source's spend in one transaction, before
  the update trains (so a crash can only over-count ε);
* a re-run of an update number whose entry never got a version replaces that entry (its
  model was never released), and nothing else is ever deleted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine

from flywheel.store.database import session_factory
from flywheel.store.models import PrivacyLedgerEntry, PrivacySourceSpend

CHUNK = 500  # sources per IN (...) query

MechanismValues = tuple[float, float, int]  # (sample rate q, noise multiplier σ, steps)


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


@dataclass(frozen=True)
class SourceSpend:
    """Per source: ε so far (its latest cumulative value), updates, examples, versions."""

    source: str
    epsilon: float
    updates: int
    examples: int
    versions: tuple[str, ...]


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

    def histories(self, lineage: str, sources: Iterable[str]) -> dict[str, list[MechanismValues]]:
        """The mechanisms each of `sources` took part in so far (absent: none)."""
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
                    )
                    .join(PrivacyLedgerEntry, PrivacyLedgerEntry.id == PrivacySourceSpend.ledger_id)
                    .where(
                        PrivacyLedgerEntry.lineage == lineage,
                        PrivacySourceSpend.source.in_(wanted[i : i + CHUNK]),
                    )
                ).all()
                for source, q, sigma, steps in rows:
                    out[source].append((q, sigma, steps))
        return dict(out)

    def lineage_epsilon(self, lineage: str) -> float:
        with self.sessions() as session:
            value = session.execute(
                select(func.max(PrivacyLedgerEntry.epsilon_lineage)).where(
                    PrivacyLedgerEntry.lineage == lineage
                )
            ).scalar()
        return float(value or 0.0)

    def record(self, entry: Mapping[str, Any], spends: Mapping[str, tuple[int, float]]) -> int:
        """Write one update's entry and its sources (examples, ε after) atomically."""
        with self.sessions.begin() as session:
            stale = session.execute(
                select(PrivacyLedgerEntry.id).where(
                    PrivacyLedgerEntry.lineage == entry["lineage"],
                    PrivacyLedgerEntry.update_no == entry["update_no"],
                    PrivacyLedgerEntry.version.is_(None),
                )
            ).scalar()
            if stale is not None:
                session.execute(
                    delete(PrivacySourceSpend).where(PrivacySourceSpend.ledger_id == stale)
                )
                session.execute(delete(PrivacyLedgerEntry).where(PrivacyLedgerEntry.id == stale))
                session.flush()
            row = PrivacyLedgerEntry(**entry)
            session.add(row)
            session.flush()
            session.add_all(
                PrivacySourceSpend(ledger_id=row.id, source=s, examples=n, epsilon=eps)
                for s, (n, eps) in spends.items()
            )
            return int(row.id)

    def set_version(self, lineage: str, update_no: int, version: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(PrivacyLedgerEntry)
                .where(
                    PrivacyLedgerEntry.lineage == lineage, PrivacyLedgerEntry.update_no == update_no
                )
                .values(version=version)
            )

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
                PrivacyLedgerEntry.id,
            )
            .join(PrivacyLedgerEntry, PrivacyLedgerEntry.id == PrivacySourceSpend.ledger_id)
            .order_by(PrivacyLedgerEntry.id)
        )
        if lineage is not None:
            query = query.where(PrivacyLedgerEntry.lineage == lineage)
        acc: dict[str, dict[str, Any]] = {}
        with self.sessions() as session:
            for source, eps, n, version, _ in session.execute(query):
                a = acc.setdefault(
                    source, {"eps": 0.0, "updates": 0, "examples": 0, "versions": []}
                )
                a["eps"] = max(a["eps"], eps)
                a["updates"] += 1
                a["examples"] += n
                if version:
                    a["versions"].append(version)
        return sorted(
            (
                SourceSpend(s, a["eps"], a["updates"], a["examples"], tuple(a["versions"]))
                for s, a in acc.items()
            ),
            key=lambda s: (-s.epsilon, s.source),
        )
