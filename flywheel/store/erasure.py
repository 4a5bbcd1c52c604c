"""Erasure of a data subject: every stored row about them, in one transaction, and a receipt.

`erase_subject(session, subject, requested_by, now)` takes the subject's keyed hash
(`flywheel.subjects.subject_key`; the raw id never reaches the store) and deletes, through
`flywheel.store.retention.delete_rows` (the one delete path, which reaches every partition):

- `corrections` whose `subject` is the hash (indexed, partial index on `subject`);
- `predictions` those corrections point to (by id, 900 ids a statement): the subject's
  request, features included, even when a correction without a subject points to it too;
- `examples` whose `privacy_unit` is `subject:<hash>` (indexed): the examples made from the
  subject's corrections and the counterexamples derived from them, which carry the same
  unit (`flywheel.feedback.examples`);
- `scores` and `outcomes` of those predictions (issue 28, by the primary key's first
  column): other versions' answers to the subject's request, and every version's result
  on the subject's label. The live decisions lose those labels; they never need a
  particular one.

Left as they are, on purpose: `counterexample_usage` (per source app and minute counts, no
data about anyone; lowering them would let an app win back poisoning budget by asking for
erasures) and the privacy ledger's per-unit spend (`privacy_source_spend` keeps the hash
and the ε it spent, no data: dropping it would understate the privacy report, and a
returning subject would start a fresh budget). Examples stored before migration 0012 have
no unit and cannot be told apart by subject; they leave with retention (FLYWHEEL_RETENTION_*).

Every call writes an `erasure_receipts` row (a repeated call deletes 0 rows and says so: a
record of each request, not only of the first). The feedback workers read the receipts
(`erased_subjects`) and do not store a correction of an erased subject replayed from Kafka.

`non_dp_versions` lists the versions trained without DP that may hold the subject's data:
an online version's tags give the example ids it trained on (`examples`: `ids A..B`); a
version whose range ends at or after the subject's first example id trained on it, or
descends from one that did (a version starts from its parent's weights). The range is an
envelope (replayed examples sit inside it), so the list can hold a version that never saw
the subject's rows, never miss one that did. Versions without such a tag (seed, imported,
federated) are not listed: they were not trained on the store's traffic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flywheel.store.models import (
    Correction,
    ErasureReceipt,
    Example,
    Outcome,
    Prediction,
    Score,
)
from flywheel.store.retention import delete_rows
from flywheel.subjects import SUBJECT_KEY_PATTERN, privacy_unit

__all__ = [
    "ERASED_TABLES",
    "Erasure",
    "erase_subject",
    "erased_subjects",
    "non_dp_versions",
]

ERASED_TABLES = ("corrections", "predictions", "examples", "scores", "outcomes")
CHUNK = 900  # ids per IN (...) list: well under every database's parameter limit
_RANGE = re.compile(r"^ids (\d+)\.\.(\d+)\b")


@dataclass(frozen=True)
class Erasure:
    """One receipt: what an erasure deleted (rows per table), when, and for whom."""

    receipt_id: int
    subject: str  # the keyed hash
    erased_at: datetime
    requested_by: str
    deleted: dict[str, int]
    # the subject's first example id over every erasure of them (None: never had one)
    first_example_id: int | None
    repeated: bool = False  # an earlier receipt exists for the subject
    # filled by the caller from the registry (None: not looked up, `versions_note` says why)
    non_dp_versions: list[str] | None = None
    versions_note: str = ""

    def doc(self) -> dict[str, object]:
        """The JSON document the CLI prints and the admin API answers."""
        return {
            "receipt": self.receipt_id,
            "subject": self.subject,
            "erased_at": self.erased_at.isoformat(),
            "requested_by": self.requested_by,
            "deleted": self.deleted,
            "deleted_total": sum(self.deleted.values()),
            "repeated": self.repeated,
            "first_example_id": self.first_example_id,
            "non_dp_versions": self.non_dp_versions,
            "versions_note": self.versions_note,
        }


def erase_subject(session: Session, subject: str, requested_by: str, now: datetime) -> Erasure:
    """Delete every stored row about `subject` (a keyed hash) and write the receipt, in
    `session`'s transaction (the caller commits: all of it or none)."""
    if not re.fullmatch(SUBJECT_KEY_PATTERN, subject):
        raise ValueError("subject must be a keyed hash (64 lowercase hex digits), never a raw id")
    unit = privacy_unit(subject, "")
    earlier = session.execute(
        select(func.count(), func.min(ErasureReceipt.first_example_id)).where(
            ErasureReceipt.subject == subject
        )
    ).one()
    first_now = session.scalar(select(func.min(Example.id)).where(Example.privacy_unit == unit))
    firsts = [f for f in (earlier[1], first_now) if f is not None]
    predictions = sorted(
        set(session.scalars(select(Correction.prediction_id).where(Correction.subject == subject)))
    )
    deleted = {"corrections": delete_rows(session, Correction, Correction.subject == subject)}
    deleted["predictions"] = sum(
        delete_rows(session, Prediction, Prediction.id.in_(predictions[i : i + CHUNK]))
        for i in range(0, len(predictions), CHUNK)
    )
    deleted["examples"] = delete_rows(session, Example, Example.privacy_unit == unit)
    for name, model in (("scores", Score), ("outcomes", Outcome)):
        deleted[name] = sum(
            delete_rows(session, model, model.prediction_id.in_(predictions[i : i + CHUNK]))
            for i in range(0, len(predictions), CHUNK)
        )
    receipt = ErasureReceipt(
        subject=subject,
        erased_at=now,
        requested_by=requested_by,
        deleted=deleted,
        first_example_id=first_now,
    )
    session.add(receipt)
    session.flush()
    return Erasure(
        receipt.id,
        subject,
        now,
        requested_by,
        deleted,
        min(firsts) if firsts else None,
        repeated=earlier[0] > 0,
    )


def erased_subjects(session: Session, subjects: Iterable[str | None]) -> set[str]:
    """Which of `subjects` (keyed hashes) have been erased: one indexed read."""
    wanted = sorted({s for s in subjects if s})
    found: set[str] = set()
    for i in range(0, len(wanted), CHUNK):
        chunk = wanted[i : i + CHUNK]
        found.update(
            session.scalars(
                select(ErasureReceipt.subject).where(ErasureReceipt.subject.in_(chunk)).distinct()
            )
        )
    return found


class _Version(Protocol):
    @property
    def version(self) -> str: ...
    @property
    def tags(self) -> dict[str, str]: ...


def non_dp_versions(versions: Iterable[_Version], first_example_id: int | None) -> list[str]:
    """The versions trained without DP whose example range reaches `first_example_id`
    (the subject's first example), oldest first; none if the subject had no example."""
    if first_example_id is None:
        return []
    out = []
    for v in versions:
        tags = v.tags
        if tags.get("epsilon", "none") != "none":
            continue  # trained with DP: the guarantee covers the subject
        found = _RANGE.match(tags.get("examples", ""))
        if found is not None and int(found.group(2)) >= first_example_id:
            out.append(str(v.version))
    return sorted(out, key=lambda s: int(s) if s.isdigit() else 0)
