"""The durable join of corrections to predictions, in the training store.

Both sides are written as they arrive, in any order; a correction waits as `pending`
until its prediction is stored. Claiming a join is a conditional update
(`pending` -> `joined`), so two workers, or one worker replaying a batch after a crash,
can never join the same correction twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from flywheel.events import CorrectionEvent, PredictionEvent
from flywheel.feedback.store import (
    Correction,
    CorrectionStatus,
    Prediction,
    insert_ignoring_duplicates,
)
from flywheel.feedback.store.models import UTCDateTime

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
    if prediction_ids is not None and session.get_bind().dialect.name == "postgresql":
        return _claim_postgresql(session, sorted(set(prediction_ids)), now)
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


_CLAIM_PG = (
    "UPDATE corrections AS c SET status = %(joined)s, joined_at = %(now)s"
    " FROM jsonb_array_elements_text(CAST(%(ids)s AS JSONB)) AS i(pid), predictions AS p"
    " WHERE c.prediction_id = i.pid AND p.id = c.prediction_id AND c.status = %(pending)s"
    " RETURNING c.id, c.prediction_id, c.label, c.source, c.created_at, p.model_name,"
    " p.model_version, p.features, p.probabilities, p.label")


def _claim_postgresql(session: Session, ids: list[str], now: datetime) -> list[JoinedPair]:
    """The claim as ONE statement: update-with-join, the ids as one JSON parameter.

    Same conditional update as the portable path (`pending` -> `joined`; under READ
    COMMITTED PostgreSQL re-checks the condition on a row a concurrent worker changed,
    so a correction is never claimed twice), without the SELECT before it or IN-lists.
    Never a prepared statement: PostgreSQL would soon plan it once for any parameters,
    blind to how many ids a batch holds, and that plan was 10x slower. Pairs come oldest
    correction first (then by id), a repeatable order, as the sweep hands them out.
    """
    if not ids:
        return []
    now = UTCDateTime().process_bind_param(now, session.get_bind().dialect)
    cursor = session.connection().connection.driver_connection.cursor()
    try:
        cursor.execute(_CLAIM_PG, {
            "joined": CorrectionStatus.JOINED.value, "pending": CorrectionStatus.PENDING.value,
            "now": now, "ids": orjson.dumps(ids).decode()}, prepare=False)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    pairs = [JoinedPair(r[0], r[1], r[2], r[3], r[4].astimezone(UTC), r[5], r[6], r[7], r[8],
                        r[9]) for r in rows]
    pairs.sort(key=lambda p: (p.corrected_at, p.correction_id))
    return pairs


def expire_corrections(session: Session, older_than: datetime) -> int:
    """Give up on corrections whose prediction never arrived."""
    result = session.execute(
        update(Correction)
        .where(Correction.status == CorrectionStatus.PENDING.value,
               Correction.created_at < older_than)
        .values(status=CorrectionStatus.EXPIRED.value))
    return result.rowcount or 0
