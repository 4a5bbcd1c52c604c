"""The privacy ledger: every DP update of a lineage, and which sources took part in it.

The entry is written before the update trains, so a crash can only over-count ε, never
under-count it. A re-run of an update number whose entry never got a version (the
learner died before registering it) replaces that entry: its model was never released.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine

from flywheel.privacy.accounting import Mechanism
from flywheel.store import (
    PrivacyLedgerEntry,
    PrivacySourceSpend,
    session_factory,
)

_CHUNK = 500  # sources per IN (...) query


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    lineage: str
    update_no: int
    version: str | None
    created_at: datetime
    accountant: str
    engine: str
    mechanism: Mechanism
    max_grad_norm: float
    delta: float
    epsilon_update: float
    epsilon_lineage: float
    sources: int
    examples: int
    public_examples: int
    capped_examples: int
    excluded_examples: int

    def as_dict(self) -> dict:
        return {"id": self.id, "lineage": self.lineage, "update": self.update_no,
                "version": self.version, "created_at": self.created_at.isoformat(),
                "accountant": self.accountant, "engine": self.engine,
                "sample_rate": self.mechanism.sample_rate,
                "noise_multiplier": self.mechanism.noise_multiplier,
                "steps": self.mechanism.steps, "max_grad_norm": self.max_grad_norm,
                "delta": self.delta, "epsilon_update": self.epsilon_update,
                "epsilon_lineage": self.epsilon_lineage, "sources": self.sources,
                "examples": self.examples, "public_examples": self.public_examples,
                "capped_examples": self.capped_examples,
                "excluded_examples": self.excluded_examples}


@dataclass(frozen=True)
class SourceSpend:
    source: str
    epsilon: float
    updates: int
    examples: int
    versions: tuple[str, ...]


def _entry(row: PrivacyLedgerEntry) -> LedgerEntry:
    return LedgerEntry(row.id, row.lineage, row.update_no, row.version, row.created_at,
                       row.accountant, row.engine,
                       Mechanism(row.sample_rate, row.noise_multiplier, row.steps),
                       row.max_grad_norm, row.delta, row.epsilon_update, row.epsilon_lineage,
                       row.sources, row.examples, row.public_examples, row.capped_examples,
                       row.excluded_examples)


class PrivacyLedger:
    """Reads and writes the ledger tables of the training store."""

    def __init__(self, engine: Engine) -> None:
        self.sessions = session_factory(engine)

    def histories(self, lineage: str, sources: Iterable[str]) -> dict[str, list[Mechanism]]:
        """The mechanisms each of `sources` took part in so far (absent: none)."""
        sources = sorted(set(sources))
        out: dict[str, list[Mechanism]] = defaultdict(list)
        with self.sessions() as session:
            for i in range(0, len(sources), _CHUNK):
                rows = session.execute(
                    select(PrivacySourceSpend.source, PrivacyLedgerEntry.sample_rate,
                           PrivacyLedgerEntry.noise_multiplier, PrivacyLedgerEntry.steps)
                    .join(PrivacyLedgerEntry,
                          PrivacyLedgerEntry.id == PrivacySourceSpend.ledger_id)
                    .where(PrivacyLedgerEntry.lineage == lineage,
                           PrivacySourceSpend.source.in_(sources[i:i + _CHUNK]))).all()
                for source, q, sigma, steps in rows:
                    out[source].append(Mechanism(q, sigma, steps))
        return dict(out)

    def lineage_epsilon(self, lineage: str) -> float:
        with self.sessions() as session:
            value = session.execute(select(func.max(PrivacyLedgerEntry.epsilon_lineage))
                                    .where(PrivacyLedgerEntry.lineage == lineage)).scalar()
        return float(value or 0.0)

    def record(self, entry: dict, spends: dict[str, tuple[int, float]]) -> int:
        """Write one update's entry and its sources (examples, ε after) atomically."""
        with self.sessions.begin() as session:
            stale = session.execute(
                select(PrivacyLedgerEntry.id).where(
                    PrivacyLedgerEntry.lineage == entry["lineage"],
                    PrivacyLedgerEntry.update_no == entry["update_no"],
                    PrivacyLedgerEntry.version.is_(None))).scalar()
            if stale is not None:
                session.execute(delete(PrivacySourceSpend)
                                .where(PrivacySourceSpend.ledger_id == stale))
                session.execute(delete(PrivacyLedgerEntry)
                                .where(PrivacyLedgerEntry.id == stale))
                session.flush()
            row = PrivacyLedgerEntry(**entry)
            session.add(row)
            session.flush()
            session.add_all(PrivacySourceSpend(ledger_id=row.id, source=s, examples=n,
                                               epsilon=eps)
                            for s, (n, eps) in spends.items())
            return int(row.id)

    def set_version(self, lineage: str, update_no: int, version: str) -> None:
        with self.sessions.begin() as session:
            session.execute(update(PrivacyLedgerEntry)
                            .where(PrivacyLedgerEntry.lineage == lineage,
                                   PrivacyLedgerEntry.update_no == update_no)
                            .values(version=version))

    def entries(self, lineage: str | None = None) -> list[LedgerEntry]:
        query = select(PrivacyLedgerEntry).order_by(PrivacyLedgerEntry.id)
        if lineage is not None:
            query = query.where(PrivacyLedgerEntry.lineage == lineage)
        with self.sessions() as session:
            return [_entry(r) for r in session.scalars(query)]

    def entry_for_version(self, version: str) -> LedgerEntry | None:
        with self.sessions() as session:
            row = session.scalars(select(PrivacyLedgerEntry)
                                  .where(PrivacyLedgerEntry.version == version)).first()
            return None if row is None else _entry(row)

    def sources(self, lineage: str | None = None) -> list[SourceSpend]:
        """Per source: ε so far (its latest cumulative value), updates, examples, versions."""
        query = (select(PrivacySourceSpend.source, PrivacySourceSpend.epsilon,
                        PrivacySourceSpend.examples, PrivacyLedgerEntry.version,
                        PrivacyLedgerEntry.id)
                 .join(PrivacyLedgerEntry, PrivacyLedgerEntry.id == PrivacySourceSpend.ledger_id)
                 .order_by(PrivacyLedgerEntry.id))
        if lineage is not None:
            query = query.where(PrivacyLedgerEntry.lineage == lineage)
        acc: dict[str, dict] = {}
        with self.sessions() as session:
            for source, eps, n, version, _ in session.execute(query):
                a = acc.setdefault(source, {"eps": 0.0, "updates": 0, "examples": 0,
                                            "versions": []})
                a["eps"] = max(a["eps"], eps)
                a["updates"] += 1
                a["examples"] += n
                if version:
                    a["versions"].append(version)
        return sorted((SourceSpend(s, a["eps"], a["updates"], a["examples"],
                                   tuple(a["versions"])) for s, a in acc.items()),
                      key=lambda s: (-s.epsilon, s.source))
