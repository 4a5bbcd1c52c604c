"""The durable join of corrections to predictions, in the training store.

Both sides are written as they arrive, in any order. A correction whose prediction is
known -- in the same batch, in the worker's cache of what it stored, or in the store --
is inserted already `joined`; one whose prediction is not waits as `pending` until the
prediction is stored, and is then claimed by a conditional update (`pending` ->
`joined`). Either way a correction is joined by exactly one transaction: the one whose
INSERT created the row, or the one whose update changed its status. Two workers, or one
worker replaying a batch after a crash, can never join the same correction twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import orjson
from sqlalchemy import Row, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from flywheel.events import CorrectionEvent, PredictionEvent, ScoreEvent
from flywheel.feedback.messages import CONTENT, duplicate_reason
from flywheel.feedback.prediction_cache import KnownPrediction
from flywheel.store import (
    Correction,
    CorrectionStatus,
    Prediction,
    UTCDateTime,
    driver_connection,
    insert_returning_new,
)

CHUNK = 900  # ids per IN (...) list: well under every database's parameter limit


class JoinedPair(NamedTuple):
    """A correction claimed for analysis, with the prediction it corrects.

    (A named tuple: a worker makes one per correction, and a frozen dataclass of ten
    fields costs 1.8 us to create, four times as much.)"""

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
    subject: str | None = None  # the data subject's keyed hash (flywheel.subjects)
    predicted_at: datetime | None = None  # the prediction's timestamp (its outcome's)


@dataclass
class StoredBatch:
    """What one batch's transaction wrote and joined."""

    new_predictions: list[PredictionEvent] = field(default_factory=list)  # rows it created
    known: dict[str, KnownPrediction] = field(default_factory=dict)  # the same, for joins
    new_corrections: int = 0
    pairs: list[JoinedPair] = field(default_factory=list)  # joined by this transaction
    pending: list[CorrectionEvent] = field(default_factory=list)  # stored as pending
    # events whose id the store holds with other content, and why (dead-lettered)
    conflicts: list[tuple[PredictionEvent | CorrectionEvent | ScoreEvent, str]] = field(
        default_factory=list
    )


def store_and_join(
    session: Session,
    predictions: Sequence[PredictionEvent],
    corrections: Sequence[CorrectionEvent],
    now: datetime,
    known: Callable[[str], KnownPrediction | None] = lambda _: None,
) -> StoredBatch:
    """Write a batch's events and join every correction that can be joined now.

    - predictions are inserted (duplicates skipped);
    - each correction's prediction is looked for in this batch, then `known` (the
      worker's cache), then the store; found: the correction is inserted `joined`, else
      `pending`;
    - pending corrections of this batch's new predictions are claimed;
    - a correction that was already stored (a replay) is claimed if it is still pending.

    The pairs come oldest correction first (then by id): a repeatable order, the order in
    which the per-source counterexample budget is handed out.
    """
    out = StoredBatch()
    predictions, corrections = first_of_each(predictions), first_of_each(corrections)
    new_ids = set(
        insert_returning_new(session, Prediction, [prediction_row(e) for e in predictions])
    )
    out.new_predictions = [e for e in predictions if e.id in new_ids]
    out.conflicts += conflicts_with_store(session, predictions, new_ids)
    in_batch = out.known = {e.id: KnownPrediction.of(e) for e in out.new_predictions}
    found: dict[str, KnownPrediction] = {}
    missing = []
    for c in corrections:
        pid = c.prediction_id
        hit = in_batch.get(pid) or known(pid)
        if hit is None:
            missing.append(pid)
        else:
            found[pid] = hit
    if missing:
        found.update(lookup_predictions(session, missing))
    rows = [correction_row(c, c.prediction_id in found, now) for c in corrections]
    created = set(insert_returning_new(session, Correction, rows))
    out.new_corrections = len(created)
    out.conflicts += conflicts_with_store(session, corrections, created)
    for c in corrections:
        if c.id not in created:
            continue
        if c.prediction_id in found:
            out.pairs.append(
                pair_of(
                    c.id,
                    c.prediction_id,
                    c.label,
                    c.source,
                    c.timestamp,
                    found[c.prediction_id],
                    c.subject,
                )
            )
        else:
            out.pending.append(c)
    out.pairs += claim_for(session, in_batch, now)
    replayed = {
        c.prediction_id
        for c in corrections
        if c.id not in created and c.prediction_id not in in_batch
    }
    if replayed:  # stored earlier as pending; their prediction may be here now
        out.pairs += claim_joins(session, replayed, now)
    out.pairs.sort(key=lambda p: (p.corrected_at, p.correction_id))
    return out


_JOINED, _PENDING = CorrectionStatus.JOINED.value, CorrectionStatus.PENDING.value
E = TypeVar("E", PredictionEvent, CorrectionEvent)


def first_of_each(events: Sequence[E]) -> list[E]:
    """One event per id, the first delivered (as the duplicate-skipping INSERT keeps)."""
    first: dict[str, E] = {}
    for e in events:
        first.setdefault(e.id, e)
    return list(first.values())


def correction_row(c: CorrectionEvent, joined: bool, now: datetime) -> dict:
    return {
        "id": c.id,
        "prediction_id": c.prediction_id,
        "label": c.label,
        "source": c.source,
        "subject": c.subject,
        "created_at": c.timestamp,
        "status": _JOINED if joined else _PENDING,
        "joined_at": now if joined else None,
    }


def prediction_columns(events: Sequence[PredictionEvent]) -> dict[str, list]:
    """`prediction_row` of each, a column at a time (no dict per row)."""
    return {
        "id": [e.id for e in events],
        "model_name": [e.model_name for e in events],
        "model_version": [e.model_version for e in events],
        "features": [e.features for e in events],
        "probabilities": [e.probabilities for e in events],
        "label": [e.label for e in events],
        "created_at": [e.timestamp for e in events],
        "latency_ms": [e.latency_ms for e in events],
    }


def prediction_row(e: PredictionEvent) -> dict:
    return {
        "id": e.id,
        "model_name": e.model_name,
        "model_version": e.model_version,
        "features": e.features,
        "probabilities": e.probabilities,
        "label": e.label,
        "created_at": e.timestamp,
        "latency_ms": e.latency_ms,
    }


def pair_of(
    correction_id: str,
    prediction_id: str,
    label: str,
    source: str | None,
    corrected_at: datetime,
    p: KnownPrediction,
    subject: str | None,
) -> JoinedPair:
    return JoinedPair(
        correction_id,
        prediction_id,
        label,
        source,
        corrected_at.astimezone(UTC),
        p.model_name,
        p.model_version,
        p.features,
        p.probabilities,
        p.label,
        subject,
        p.predicted_at,
    )


def conflicts_with_store(
    session: Session, events: Sequence[PredictionEvent | CorrectionEvent], new: set[str]
) -> list[tuple[PredictionEvent | CorrectionEvent, str]]:
    """The events of `events` not in `new` (their id was stored already) whose stored
    row says something else, each with the reason. A redelivery -- a replay after a crash,
    a producer's retry -- has the same content and is skipped, as it always was; a
    different record under a stored id was skipped too, silently, and is dead-lettered
    now. Costs a read only for ids that were stored already (replays)."""
    old = [e for e in events if e.id not in new]
    if not old:
        return []
    stored = _stored_content(session, type(old[0]), [e.id for e in old])
    out = []
    for e in old:
        first = stored.get(e.id)
        why = None if first is None else duplicate_reason(e, first, "is stored already")
        if why is not None:
            out.append((e, why))
    return out


def stored_contents(
    session: Session, events: Sequence[PredictionEvent | CorrectionEvent]
) -> dict[str, dict[str, Any]]:
    """What the store holds under each event's id, by `CONTENT`'s field names; an id it
    does not hold is absent. One read per kind, only for these ids."""
    out: dict[str, dict[str, Any]] = {}
    for kind in (PredictionEvent, CorrectionEvent):
        ids = [e.id for e in events if isinstance(e, kind)]
        if ids:
            out.update(_stored_content(session, kind, ids))
    return out


def _stored_content(session: Session, kind: type, ids: list[str]) -> dict[str, dict[str, Any]]:
    """What the store holds of each id, by `CONTENT`'s field names."""
    if kind is PredictionEvent:
        columns: dict[str, Any] = {
            "model_name": Prediction.model_name,
            "model_version": Prediction.model_version,
            "features": Prediction.features,
            "probabilities": Prediction.probabilities,
            "label": Prediction.label,
            "timestamp": Prediction.created_at,
            "latency_ms": Prediction.latency_ms,
        }
        key: Any = Prediction.id
    else:
        columns = {
            "prediction_id": Correction.prediction_id,
            "label": Correction.label,
            "source": Correction.source,
            "subject": Correction.subject,
        }
        key = Correction.id
    assert tuple(columns) == CONTENT[kind]
    out = {}
    for chunk in _chunks(sorted(set(ids))):
        for row in session.execute(select(key, *columns.values()).where(key.in_(chunk))):
            out[row[0]] = dict(zip(columns, row[1:], strict=True))
    return out


# The newest row of each id (there is one: see flywheel.store.partitions): on the table
# partitioned by day, an ordered Append over the partitions' (id, created_at) keys, newest
# first, that stops at the first hit, instead of probing every partition for every id.
_LOOKUP_PG = (
    "SELECT p.id, p.model_name, p.model_version, p.features, p.probabilities, p.label,"
    " p.created_at FROM jsonb_array_elements_text(CAST(%(ids)s AS JSONB)) AS i(pid) CROSS JOIN"
    " LATERAL (SELECT id, model_name, model_version, features, probabilities, label,"
    " created_at FROM predictions"
    " WHERE id = i.pid ORDER BY created_at DESC LIMIT 1) AS p"
)


def lookup_predictions(session: Session, ids: Iterable[str]) -> dict[str, KnownPrediction]:
    """Stored predictions by id (those that exist).

    PostgreSQL: one statement for all the ids, the newest row of each, never prepared (as
    `_claim_postgresql`). An `IN (...)` list on the partitioned table was planned as a scan
    of every partition for every id: `bench storage` joined 0.33x as fast at the end of a
    month of 1 M predictions as after its first day."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        cursor = driver_connection(session).cursor()
        try:
            cursor.execute(_LOOKUP_PG, {"ids": orjson.dumps(wanted).decode()}, prepare=False)
            return {r[0]: KnownPrediction(*r[1:]) for r in cursor.fetchall()}
        finally:
            cursor.close()
    out = {}
    for chunk in _chunks(wanted):
        for row in session.execute(
            select(
                Prediction.id,
                Prediction.model_name,
                Prediction.model_version,
                Prediction.features,
                Prediction.probabilities,
                Prediction.label,
                Prediction.created_at,
            ).where(Prediction.id.in_(chunk))
        ):
            out[row[0]] = KnownPrediction(*row[1:])
    return out


# The status literals are in the text, so the planner can use the partial index of
# pending corrections (a parameter would not prove its predicate).
_CLAIM_KNOWN_PG = (
    f"UPDATE corrections AS c SET status = '{_JOINED}', joined_at = %(now)s"
    " FROM jsonb_array_elements_text(CAST(%(ids)s AS JSONB)) AS i(pid)"
    f" WHERE c.prediction_id = i.pid AND c.status = '{_PENDING}'"
    " RETURNING c.id, c.prediction_id, c.label, c.source, c.created_at, c.subject"
)


def claim_for(
    session: Session, predictions: dict[str, KnownPrediction], now: datetime
) -> list[JoinedPair]:
    """Claim the pending corrections of predictions stored in this transaction; their
    features come from memory, not back from the store."""
    if not predictions:
        return []
    if session.get_bind().dialect.name != "postgresql":
        return claim_joins(session, predictions, now)
    stamp = UTCDateTime().process_bind_param(now, session.get_bind().dialect)
    cursor = driver_connection(session).cursor()
    try:  # never prepared: see _claim_postgresql
        cursor.execute(
            _CLAIM_KNOWN_PG,
            {"now": stamp, "ids": orjson.dumps(list(predictions)).decode()},
            prepare=False,
        )
        rows = cursor.fetchall()
    finally:
        cursor.close()
    return [pair_of(r[0], r[1], r[2], r[3], r[4], predictions[r[1]], r[5]) for r in rows]


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(ids), CHUNK):
        yield ids[i : i + CHUNK]


def claim_joins(
    session: Session, prediction_ids: Iterable[str] | None, now: datetime, limit: int = 10_000
) -> list[JoinedPair]:
    """Join pending corrections whose prediction is stored; `None` looks at all of them."""
    if prediction_ids is not None and session.get_bind().dialect.name == "postgresql":
        return _claim_postgresql(session, sorted(set(prediction_ids)), now)
    candidates: list[Row[*tuple[Any, ...]]] = []
    pending = (
        select(
            Correction.id,
            Correction.prediction_id,
            Correction.label,
            Correction.source,
            Correction.created_at,
            Prediction.model_name,
            Prediction.model_version,
            Prediction.features,
            Prediction.probabilities,
            Prediction.label,
            Correction.subject,
            Prediction.created_at,
        )
        .join(Prediction, Prediction.id == Correction.prediction_id)
        .where(Correction.status == CorrectionStatus.PENDING.value)
    )
    if prediction_ids is None:
        candidates = list(
            session.execute(pending.order_by(Correction.created_at).limit(limit)).all()
        )
    else:
        ids = sorted(set(prediction_ids))
        for chunk in _chunks(ids):
            candidates += session.execute(pending.where(Correction.prediction_id.in_(chunk))).all()
    if not candidates:
        return []
    claimed: set[str] = set()
    for chunk in _chunks([c[0] for c in candidates]):
        claimed.update(
            session.scalars(
                update(Correction)
                .where(
                    Correction.id.in_(chunk), Correction.status == CorrectionStatus.PENDING.value
                )
                .values(status=CorrectionStatus.JOINED.value, joined_at=now)
                .returning(Correction.id)
            )
        )
    return [JoinedPair(*row) for row in candidates if row[0] in claimed]


_CLAIM_PG = (
    f"UPDATE corrections AS c SET status = '{_JOINED}', joined_at = %(now)s"
    " FROM jsonb_array_elements_text(CAST(%(ids)s AS JSONB)) AS i(pid), predictions AS p"
    f" WHERE c.prediction_id = i.pid AND p.id = c.prediction_id AND c.status = '{_PENDING}'"
    " RETURNING c.id, c.prediction_id, c.label, c.source, c.created_at, p.model_name,"
    " p.model_version, p.features, p.probabilities, p.label, c.subject, p.created_at"
)


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
    stamp = UTCDateTime().process_bind_param(now, session.get_bind().dialect)
    cursor = driver_connection(session).cursor()
    try:
        cursor.execute(_CLAIM_PG, {"now": stamp, "ids": orjson.dumps(ids).decode()}, prepare=False)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    pairs = [
        JoinedPair(
            r[0],
            r[1],
            r[2],
            r[3],
            r[4].astimezone(UTC),
            r[5],
            r[6],
            r[7],
            r[8],
            r[9],
            r[10],
            r[11].astimezone(UTC),
        )
        for r in rows
    ]
    pairs.sort(key=lambda p: (p.corrected_at, p.correction_id))
    return pairs


def expire_corrections(session: Session, older_than: datetime) -> int:
    """Give up on corrections whose prediction never arrived."""
    result = session.execute(
        update(Correction)
        .where(
            Correction.status == CorrectionStatus.PENDING.value, Correction.created_at < older_than
        )
        .values(status=CorrectionStatus.EXPIRED.value)
    )
    assert isinstance(result, CursorResult)  # an UPDATE's (Session.execute is typed Result)
    return result.rowcount or 0
