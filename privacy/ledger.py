"""The privacy ledger: every DP update of a lineage, and which sources took part in it.

The entry is written before the update trains, so a crash can only over-count ε, never
under-count it. A re-run of an update number whose entry never got a version (the
learner died before registering it) replaces that entry: its model was never released.
The tables and their SQL are the store's (`flywheel.store.LedgerTables`); this module
gives their rows meaning: mechanisms the accountants take.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from flywheel.privacy.accounting import Mechanism
from flywheel.store import LedgerRow, LedgerTables, SourceSpend


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
        return {
            "id": self.id,
            "lineage": self.lineage,
            "update": self.update_no,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "accountant": self.accountant,
            "engine": self.engine,
            "sample_rate": self.mechanism.sample_rate,
            "noise_multiplier": self.mechanism.noise_multiplier,
            "steps": self.mechanism.steps,
            "max_grad_norm": self.max_grad_norm,
            "delta": self.delta,
            "epsilon_update": self.epsilon_update,
            "epsilon_lineage": self.epsilon_lineage,
            "sources": self.sources,
            "examples": self.examples,
            "public_examples": self.public_examples,
            "capped_examples": self.capped_examples,
            "excluded_examples": self.excluded_examples,
        }


def _entry(row: LedgerRow) -> LedgerEntry:
    return LedgerEntry(
        row.id,
        row.lineage,
        row.update_no,
        row.version,
        row.created_at,
        row.accountant,
        row.engine,
        Mechanism(row.sample_rate, row.noise_multiplier, row.steps),
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


class PrivacyLedger:
    """The ledger of one store, in the privacy component's terms."""

    def __init__(self, engine: Engine) -> None:
        self.tables = LedgerTables(engine)

    def histories(self, lineage: str, sources: Iterable[str]) -> dict[str, list[Mechanism]]:
        """The mechanisms each of `sources` took part in so far (absent: none)."""
        return {
            source: [Mechanism(*m) for m in mechanisms]
            for source, mechanisms in self.tables.histories(lineage, sources).items()
        }

    def lineage_epsilon(self, lineage: str) -> float:
        return self.tables.lineage_epsilon(lineage)

    def record(self, entry: dict[str, Any], spends: dict[str, tuple[int, float]]) -> int:
        """Write one update's entry and its sources (examples, ε after) atomically."""
        return self.tables.record(entry, spends)

    def set_version(self, lineage: str, update_no: int, version: str) -> None:
        self.tables.set_version(lineage, update_no, version)

    def entries(self, lineage: str | None = None) -> list[LedgerEntry]:
        return [_entry(r) for r in self.tables.entries(lineage)]

    def entry_for_version(self, version: str) -> LedgerEntry | None:
        row = self.tables.entry_for_version(version)
        return None if row is None else _entry(row)

    def sources(self, lineage: str | None = None) -> list[SourceSpend]:
        """Per source: ε so far (its latest cumulative value), updates, examples, versions."""
        return self.tables.sources(lineage)
