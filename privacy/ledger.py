"""The privacy ledger: every DP update of a lineage, and which sources took part in it.

The entry is written before the update trains, so a crash can only over-count ε, never
under-count it. An entry is never replaced: one whose learner died before publishing
stays, never gets a version ("never published" in the report) and keeps counting for
its sources; a re-run of that update number adds an entry of its own. A version is named
on exactly the entry its learner wrote (by row id, kept in the version's tags).
The tables and their SQL are the store's (`flywheel.store.LedgerTables`); this module
gives their rows meaning: mechanisms the accountants take.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine

from flywheel.privacy.accounting import Mechanism
from flywheel.store import ExampleReader, Lease, LedgerRow, LedgerTables, SourceSpend

# the key of the totals the learner keeps in its saved state (`flywheel.learner` writes it):
# incoming trainable examples of DP updates, and those whose unit's budget was spent
EXCLUDED_STATE_KEY = "privacy_excluded"


@dataclass(frozen=True)
class LedgerEntry(LedgerRow):
    """A ledger row as the privacy component reads it: its mechanism for the accountants."""

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism(self.sample_rate, self.noise_multiplier, self.steps, self.mechanism_kind)

    def as_dict(self) -> dict[str, Any]:
        """The row as JSON (`flywheel privacy report --json`): the stored columns, in order."""
        names = {"update_no": "update"}
        out = {names.get(f.name, f.name): getattr(self, f.name) for f in fields(LedgerRow)}
        out["created_at"] = self.created_at.isoformat()
        return out


def _entry(row: LedgerRow) -> LedgerEntry:
    return LedgerEntry(**{f.name: getattr(row, f.name) for f in fields(LedgerRow)})


class PrivacyLedger:
    """The ledger of one store, in the privacy component's terms."""

    def __init__(self, engine: Engine) -> None:
        self.tables = LedgerTables(engine)
        self.states = ExampleReader(engine)

    def excluded(self, lineages: Iterable[str]) -> dict[str, dict[str, int]]:
        """Per lineage: incoming trainable examples of its DP updates so far, and how many
        could not be trained on (their unit's budget spent), from the learner's state."""
        out = {}
        for lineage in lineages:
            totals = (self.states.load_state(lineage) or {}).get(EXCLUDED_STATE_KEY) or {}
            out[lineage] = {
                "incoming": int(totals.get("incoming", 0)),
                "excluded": int(totals.get("excluded", 0)),
            }
        return out

    def histories(
        self, lineage: str, sources: Iterable[str], since: datetime | None = None
    ) -> dict[str, list[Mechanism]]:
        """The mechanisms each of `sources` took part in so far (absent: none); `since`:
        only entries written from then on (the window of a renewing budget)."""
        return {
            source: [Mechanism(*m) for m in mechanisms]
            for source, mechanisms in self.tables.histories(lineage, sources, since).items()
        }

    def lineage_epsilon(self, lineage: str) -> float:
        return self.tables.lineage_epsilon(lineage)

    def record(
        self,
        entry: dict[str, Any],
        spends: dict[str, tuple[int, float]],
        *,
        fence: Lease | None = None,
    ) -> int:
        """Write one update's entry and its sources (examples, ε after) atomically; the new
        entry's id. `fence`: refused (LeaseLost) unless the writer holds the lineage."""
        return self.tables.record(entry, spends, fence=fence)

    def set_version(self, row_id: int, version: str, *, fence: Lease | None = None) -> None:
        """Name `version` on entry `row_id` (what `record` returned), that entry only."""
        self.tables.set_version(row_id, version, fence=fence)

    def set_version_of_update(
        self, lineage: str, update_no: int, version: str, *, fence: Lease | None = None
    ) -> int | None:
        """Versions published without a row id in their tags (before 0009): the newest
        unversioned entry of their update number; its id, or None."""
        return self.tables.set_version_of_update(lineage, update_no, version, fence=fence)

    def entries(self, lineage: str | None = None) -> list[LedgerEntry]:
        return [_entry(r) for r in self.tables.entries(lineage)]

    def entry_for_version(self, version: str) -> LedgerEntry | None:
        row = self.tables.entry_for_version(version)
        return None if row is None else _entry(row)

    def sources(self, lineage: str | None = None) -> list[SourceSpend]:
        """Per source: ε so far (its latest cumulative value), updates, examples, versions."""
        return self.tables.sources(lineage)
