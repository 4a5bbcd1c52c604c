"""The durable join of corrections to predictions, in the training store.

Both sides are written as they arrive, in any order; a correction waits as `pending`
until its prediction is stored. Claiming a join is a conditional update
(`pending` -> `joined`), so two workers, or one worker replaying a batch after a crash,
can never join the same correction twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from flywheel.events import CorrectionEvent, PredictionEvent
from flywheel.feedback.store import (
    Correction,
    CorrectionStatus,
    Prediction,
    insert_ignoring_duplicates,
)

CHUNK = 900  # ids per IN (...) list: well under every database's parameter limit


@dataclass(frozen=True)
class JoinedPair:
    """A correction claimed for analysis, with the prediction it corrects."""

    correction_id: str
    prediction_id: str
    true_label: str
    source: str | None
    corrected_at: datetime
    model_name: str
    model_version: str
    features: list[float]
    probabilities: dict[str, float]
    predicted: str


def store_events(session: Session, predictions: Sequence[PredictionEvent],
                 corrections: Sequence[CorrectionEvent]) -> tuple[int, int]:
    """Write both kinds idempotently; returns how many rows were new of each."""
    new_p = insert_ignoring_duplicates(session, Prediction, [
        {"id": e.id, "model_name": e.model_name, "model_version": e.model_version,
         "features": e.features, "probabilities": e.probabilities, "label": e.label,
         "created_at": e.timestamp, "latency_ms": e.latency_ms} for e in predictions])
    new_c = insert_ignoring_duplicates(session, Correction, [
        {"id": e.id, "prediction_id": e.prediction_id, "label": e.label, "source": e.source,
         "created_at": e.timestamp, "status": CorrectionStatus.PENDING.value}
        for e in corrections])
    return new_p, new_c


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i:i + CHUNK]


def claim_joins(session: Session, prediction_ids: Iterable[str] | None,
                now: datetime, limit: int = 10_000) -> list[JoinedPair]:
    """Join pending corrections whose prediction is stored; `None` looks at all of them."""
    candidates = []
    pending = (select(Correction.id, Correction.prediction_id, Correction.label,
                      Correction.source, Correction.created_at, Prediction.model_name,
                      Prediction.model_version, Prediction.features, Prediction.probabilities,
                      Prediction.label)
               .join(Prediction, Prediction.id == Correction.prediction_id)
               .where(Correction.status == CorrectionStatus.PENDING.value))
    if prediction_ids is None:
        candidates = session.execute(pending.order_by(Correction.created_at).limit(limit)).all()
    else:
        ids = sorted(set(prediction_ids))
        for chunk in _chunks(ids):
            candidates += session.execute(
                pending.where(Correction.prediction_id.in_(chunk))).all()
    if not candidates:
        return []
    claimed: set[str] = set()
    for chunk in _chunks([c[0] for c in candidates]):
        claimed.update(session.scalars(
            update(Correction)
            .where(Correction.id.in_(chunk),
                   Correction.status == CorrectionStatus.PENDING.value)
            .values(status=CorrectionStatus.JOINED.value, joined_at=now)
            .returning(Correction.id)))
    return [JoinedPair(*row) for row in candidates if row[0] in claimed]


def expire_corrections(session: Session, older_than: datetime) -> int:
    """Give up on corrections whose prediction never arrived."""
    result = session.execute(
        update(Correction)
        .where(Correction.status == CorrectionStatus.PENDING.value,
               Correction.created_at < older_than)
        .values(status=CorrectionStatus.EXPIRED.value))
    return result.rowcount or 0
