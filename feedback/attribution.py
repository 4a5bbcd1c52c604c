"""Live attribution (issue 28): crediting each labelled prediction to every version that
scored it, exactly once per (prediction, version), whatever order the events come in.

A prediction is scored by the version that answered it (its `predictions` row) and by
the versions the service asked beside it off the request path (`scores` rows, from
`ScoreEvent`s on `flywheel.scores`: a shadow, a guard, or the champion beside a canary).
When the first correction of a prediction joins it, each of those versions gets one
`outcomes` row: was it right, the probability it gave the true label, its log loss.

All of it runs inside the worker's batch transaction (and the sweep's), after the join,
so an outcome is written exactly when its correction is joined -- by the one transaction
that joined it (`flywheel.feedback.join`) -- or when a score arrives for a prediction
that is labelled already:

1. the batch's scores are inserted (a redelivery is skipped; a score whose (prediction,
   version) the store holds with other content is dead-lettered);
2. the first joined correction of each prediction (oldest first, as the join orders
   them) writes the answering version's outcome, insert-ignoring on the key: a
   prediction whose answering outcome comes back new is labelled *now*; one whose
   outcome was there (a second correction, a replay) is not, and nothing else is
   written for it -- a later correction never adds or changes an outcome, whatever
   its label;
3. the stored scores of the predictions labelled now get their outcomes, with that
   correction's label and time (the scores of step 1 included);
4. a new score of a prediction labelled earlier gets its outcome from the answering
   outcome's label and time (the first correction's);
5. a new score whose prediction is not labelled yet is looked at again by the worker's
   sweeps for a while (`recheck`), in case another worker was labelling it at the same
   moment, unseen.

Every write is an insert that skips existing keys, in the transaction that also
commits the Kafka-side work, so a replayed batch writes nothing new and the two arrival
orders (score first, correction first) end in the same rows.

Costs per batch with corrections: one INSERT of the answering outcomes (COPY on
PostgreSQL for 64+ rows) and one indexed read of their scores; per batch with scores,
one INSERT of them and one read of the answering outcomes of their predictions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.events import ScoreEvent
from flywheel.feedback.join import CHUNK, JoinedPair
from flywheel.feedback.messages import duplicate_reason
from flywheel.store import (
    Outcome,
    Score,
    copy_all_new,
    driver_connection,
    encode_columns,
    insert_ignoring_duplicates,
    insert_returning_new,
)

MIN_P = 1e-15  # log loss of a probability of 0 is capped at -ln(1e-15) ~ 34.5
COPY_AT = 64  # rows from which COPY beats one INSERT (flywheel.store.bulk's COPY_MIN_ROWS)


@dataclass
class Attributed:
    """What one transaction's attribution wrote."""

    new_scores: int = 0
    outcomes: int = 0  # rows written, answering and scoring versions together
    # predictions of new scores that were not labelled as this transaction saw the store
    # (`recheck` looks again: a concurrent transaction may have been labelling them)
    unlabelled: set[str] = field(default_factory=set)
    # scores whose (prediction, version) the store holds with other content, and why
    conflicts: list[tuple[ScoreEvent, str]] = field(default_factory=list)


def log_loss(p_true: float) -> float:
    """The log loss of the probability a version gave the true label, capped at
    -ln(MIN_P) for a probability of 0 (the `outcomes.log_loss` column)."""
    return -math.log(max(p_true, MIN_P))


def outcome_row(
    prediction_id: str,
    model_name: str,
    model_version: str,
    *,
    answered: bool,
    probabilities: dict[str, float],
    predicted: str,
    true_label: str,
    predicted_at: datetime,
    labelled_at: datetime,
) -> dict[str, Any]:
    """One version's outcome on a labelled prediction.

    >>> from datetime import UTC, datetime
    >>> t = datetime(2026, 1, 1, tzinfo=UTC)
    >>> r = outcome_row("p1", "m", "2", answered=False, probabilities={"a": 0.25, "b": 0.75},
    ...     predicted="b", true_label="a", predicted_at=t, labelled_at=t)
    >>> r["correct"], r["p_true"], round(r["log_loss"], 4), r["confidence"]
    (False, 0.25, 1.3863, 0.75)
    """
    p_true = float(probabilities.get(true_label, 0.0))
    return {
        "prediction_id": prediction_id,
        "model_version": model_version,
        "model_name": model_name,
        "answered": answered,
        "label": true_label,
        "predicted": predicted,
        "correct": predicted == true_label,
        "p_true": p_true,
        "log_loss": log_loss(p_true),
        "confidence": float(max(probabilities.values(), default=0.0)),
        "predicted_at": predicted_at,
        "labelled_at": labelled_at,
    }


def score_row(e: ScoreEvent) -> dict[str, Any]:
    return {
        "prediction_id": e.prediction_id,
        "model_version": e.model_version,
        "model_name": e.model_name,
        "role": e.role,
        "probabilities": e.probabilities,
        "label": e.label,
        "created_at": e.timestamp,
    }


def attribute(
    session: Session, scores: Sequence[ScoreEvent], pairs: Sequence[JoinedPair]
) -> Attributed:
    """Store `scores` and write the outcomes that `pairs` (the corrections this
    transaction joined, oldest first) and the new scores make due (see the module).

    >>> from datetime import UTC, datetime
    >>> from sqlalchemy import create_engine
    >>> from flywheel.store.models import Base, Outcome, Score
    >>> engine = create_engine("sqlite://")
    >>> Base.metadata.create_all(engine, tables=[Outcome.__table__, Score.__table__])
    >>> t = datetime(2026, 1, 1, tzinfo=UTC)
    >>> shadow = ScoreEvent(prediction_id="p1", model_name="m", model_version="2",
    ...     role="shadow", probabilities={"a": 0.9, "b": 0.1}, label="a", timestamp=t)
    >>> pair = JoinedPair("c1", "p1", "a", None, t, "m", "1", [0.0], {"a": 0.4, "b": 0.6},
    ...     "b", None, t)
    >>> with Session(engine) as s:
    ...     first = attribute(s, [shadow], [pair])
    ...     again = attribute(s, [shadow], [pair])  # a replay
    ...     sorted((o.model_version, o.answered, o.correct) for o in s.scalars(select(Outcome)))
    [('1', True, False), ('2', False, True)]
    >>> first.outcomes, again.outcomes, again.new_scores
    (2, 0, 0)
    """
    out = Attributed()
    new_scores = _store_scores(session, scores, out)
    first: dict[str, JoinedPair] = {}
    for pair in pairs:  # oldest first: the first correction of each prediction
        first.setdefault(pair.prediction_id, pair)
    labelled_now = _credit_answering(session, list(first.values()))
    out.outcomes += len(labelled_now)
    rows: list[dict[str, Any]] = []
    if labelled_now:
        for s in _stored_scores(session, labelled_now):
            p = first[s.prediction_id]
            rows.append(_scored(s, p.true_label, p.corrected_at))
    earlier = {e.prediction_id for e in new_scores} - labelled_now
    if earlier:
        labels = _answering_labels(session, earlier)
        for e in new_scores:
            if e.prediction_id in labels:
                label, at = labels[e.prediction_id]
                rows.append(_scored(e, label, at))
        out.unlabelled = earlier - set(labels)
    if rows:
        out.outcomes += insert_ignoring_duplicates(session, Outcome, rows)
    return out


def recheck(session: Session, prediction_ids: Iterable[str]) -> tuple[set[str], int]:
    """Credit the stored scores of predictions that are labelled now but were not when
    their scores were stored: (the predictions found labelled, outcome rows written).

    Closes the one gap of `attribute`: a transaction storing a score and another, on
    another worker, labelling its prediction at the same moment each miss the other's
    uncommitted row (READ COMMITTED), and the score's outcome is written by neither. The
    worker that stored the score looks again from its sweep once both have committed
    (`StoreWriter`: for RECHECK_S after the score), with the first correction's label
    from the answering outcome, as `attribute` would have. Insert-ignore: a score that
    was credited meanwhile is left as it is.

    >>> from datetime import UTC, datetime
    >>> from sqlalchemy import create_engine
    >>> from flywheel.store.models import Base, Outcome, Score
    >>> engine = create_engine("sqlite://")
    >>> Base.metadata.create_all(engine, tables=[Outcome.__table__, Score.__table__])
    >>> t = datetime(2026, 1, 1, tzinfo=UTC)
    >>> shadow = ScoreEvent(prediction_id="p1", model_name="m", model_version="2",
    ...     role="shadow", probabilities={"a": 0.9, "b": 0.1}, label="a", timestamp=t)
    >>> with Session(engine) as s:
    ...     attribute(s, [shadow], []).unlabelled  # not labelled yet
    ...     recheck(s, {"p1"})  # still not
    ...     # another worker labels p1, not seeing the score (its row was not committed)
    ...     s.add(Outcome(**outcome_row("p1", "m", "1", answered=True, probabilities={"a": 1.0},
    ...         predicted="a", true_label="a", predicted_at=t, labelled_at=t)))
    ...     recheck(s, {"p1"})
    {'p1'}
    (set(), 0)
    ({'p1'}, 1)
    """
    labels = _answering_labels(session, prediction_ids)
    if not labels:
        return set(), 0
    rows = []
    for score in _stored_scores(session, labels):
        label, at = labels[score.prediction_id]
        rows.append(_scored(score, label, at))
    return set(labels), insert_ignoring_duplicates(session, Outcome, rows)


def _answering_columns(pairs: list[JoinedPair]) -> dict[str, list[Any]]:
    """`outcome_row(..., answered=True)` of each pair, a column at a time (no dict per
    row: half the client CPU of rows, which COPY would take apart into columns again)."""
    p_true = [float(p.probabilities.get(p.true_label, 0.0)) for p in pairs]
    return {
        "prediction_id": [p.prediction_id for p in pairs],
        "model_version": [p.model_version for p in pairs],
        "model_name": [p.model_name for p in pairs],
        "answered": [True] * len(pairs),
        "label": [p.true_label for p in pairs],
        "predicted": [p.predicted for p in pairs],
        "correct": [p.predicted == p.true_label for p in pairs],
        "p_true": p_true,
        "log_loss": [log_loss(x) for x in p_true],
        "confidence": [float(max(p.probabilities.values(), default=0.0)) for p in pairs],
        # always set by the join; a pair made by hand without it: the correction's time
        "predicted_at": [p.predicted_at or p.corrected_at for p in pairs],
        "labelled_at": [p.corrected_at for p in pairs],
    }


def _credit_answering(session: Session, pairs: list[JoinedPair]) -> set[str]:
    """Write the answering versions' outcomes of `pairs` (one per prediction); the
    predictions whose outcome this wrote (labelled now) come back.

    On PostgreSQL a batch of 64 or more goes in with one COPY when every row is new (a
    batch that is not a replay, nor a second correction), encoded from columns; else
    the duplicate-skipping INSERT says which rows were new."""
    if not pairs:
        return set()
    columns = _answering_columns(pairs)
    if len(pairs) >= COPY_AT and session.get_bind().dialect.name == "postgresql":
        encoded = encode_columns(Outcome, columns)
        if encoded is not None and copy_all_new(session, encoded):
            return set(columns["prediction_id"])
    names = list(columns)
    rows = [dict(zip(names, v, strict=True)) for v in zip(*columns.values(), strict=True)]
    return {k[0] for k in insert_returning_new(session, Outcome, rows)}


def _scored(s: Score | ScoreEvent, true_label: str, labelled_at: datetime) -> dict[str, Any]:
    return outcome_row(
        s.prediction_id,
        s.model_name,
        s.model_version,
        answered=False,
        probabilities=s.probabilities,
        predicted=s.label,
        true_label=true_label,
        predicted_at=s.created_at if isinstance(s, Score) else s.timestamp,
        labelled_at=labelled_at,
    )


def _store_scores(
    session: Session, scores: Sequence[ScoreEvent], out: Attributed
) -> list[ScoreEvent]:
    """Insert the scores (first of each key); the new ones come back, and the others
    whose stored content differs go to `out.conflicts`."""
    if not scores:
        return []
    unique: dict[tuple[str, str], ScoreEvent] = {}
    for e in scores:
        unique.setdefault((e.prediction_id, e.model_version), e)
    created = set(insert_returning_new(session, Score, [score_row(e) for e in unique.values()]))
    out.new_scores = len(created)
    old = [e for k, e in unique.items() if k not in created]
    if old:
        stored = stored_score_contents(session, old)
        for e in old:
            first = stored.get((e.prediction_id, e.model_version))
            why = None if first is None else duplicate_reason(e, first, "is stored already")
            if why is not None:
                out.conflicts.append((e, why))
    return [e for k, e in unique.items() if k in created]


def stored_score_contents(
    session: Session, scores: Sequence[ScoreEvent]
) -> dict[tuple[str, str], dict[str, Any]]:
    """What the store holds of each of these scores, by (prediction id, version) and
    `CONTENT`'s field names; a score it does not hold is absent."""
    return {
        (s.prediction_id, s.model_version): {
            "model_name": s.model_name,
            "role": s.role,
            "probabilities": s.probabilities,
            "label": s.label,
            "timestamp": s.created_at,
        }
        for s in _stored_scores(session, {e.prediction_id for e in scores})
    }


def _chunks(ids: Iterable[str]) -> Iterable[list[str]]:
    wanted = sorted(ids)
    for i in range(0, len(wanted), CHUNK):
        yield wanted[i : i + CHUNK]


_SCORES_PG = (
    "SELECT prediction_id, model_version, model_name, role, probabilities, label, created_at"
    " FROM scores WHERE prediction_id = ANY(%(ids)s)"
)


def _stored_scores(session: Session, prediction_ids: Iterable[str]) -> list[Score]:
    """The scores rows of these predictions (the primary key's first column: an index
    range scan each), as unattached `Score` objects.

    PostgreSQL: one statement, the ids as one array parameter, never prepared (as the
    join's lookups): SQLAlchemy's IN list of 900 parameters cost ~45 ms of client CPU a
    batch (~50 us a correction) to build and send, more than the rest of the batch's
    attribution together."""
    wanted = sorted(set(prediction_ids))
    if not wanted:
        return []
    if session.get_bind().dialect.name == "postgresql":
        cursor = driver_connection(session).cursor()
        try:
            cursor.execute(_SCORES_PG, {"ids": wanted}, prepare=False)
            rows = cursor.fetchall()
        finally:
            cursor.close()
        return [
            Score(
                prediction_id=r[0],
                model_version=r[1],
                model_name=r[2],
                role=r[3],
                probabilities=r[4] if isinstance(r[4], dict) else orjson.loads(r[4]),
                label=r[5],
                created_at=r[6].astimezone(UTC),
            )
            for r in rows
        ]
    columns = [c for c in Score.__table__.c]
    out: list[Score] = []
    for chunk in _chunks(wanted):
        for r in session.execute(select(*columns).where(Score.prediction_id.in_(chunk))):
            out.append(Score(**dict(zip((c.key for c in columns), r, strict=True))))
    return out


_LABELS_PG = (
    "SELECT prediction_id, label, labelled_at FROM outcomes"
    " WHERE prediction_id = ANY(%(ids)s) AND answered"
)


def _answering_labels(
    session: Session, prediction_ids: Iterable[str]
) -> dict[str, tuple[str, datetime]]:
    """The true label and labelling time of each prediction that is labelled already: its
    answering version's outcome (the first joined correction's). PostgreSQL: one
    statement, the ids as one array parameter (see `_stored_scores`)."""
    wanted = sorted(set(prediction_ids))
    if not wanted:
        return {}
    if session.get_bind().dialect.name == "postgresql":
        cursor = driver_connection(session).cursor()
        try:
            cursor.execute(_LABELS_PG, {"ids": wanted}, prepare=False)
            return {r[0]: (r[1], r[2].astimezone(UTC)) for r in cursor.fetchall()}
        finally:
            cursor.close()
    out: dict[str, tuple[str, datetime]] = {}
    for chunk in _chunks(wanted):
        for pid, label, at in session.execute(
            select(Outcome.prediction_id, Outcome.label, Outcome.labelled_at).where(
                Outcome.prediction_id.in_(chunk), Outcome.answered.is_(True)
            )
        ):
            out[pid] = (label, at)
    return out
