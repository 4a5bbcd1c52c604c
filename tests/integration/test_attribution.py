"""Live attribution in the feedback worker's store transactions (issue 28), on SQLite and
PostgreSQL: every labelled prediction is credited once to each version that scored it,
whatever order predictions, scores and corrections arrive in, however often they are
replayed, and only for the prediction's first correction.

The worker's `StoreWriter` is driven batch by batch (the Kafka side is in
test_attribution_worker.py), with both of its paths: the plan prepared on the consumer
thread (`plan=True`) and the general path (`plan=False`, also what a replay takes).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from flywheel.events import CorrectionEvent, PredictionEvent, ScoreEvent
from flywheel.feedback.join import JoinedPair
from flywheel.feedback.messages import Rejected, content_of, duplicate_reason
from flywheel.feedback.observer import TimedAnalysis, WorkerObserver
from flywheel.feedback.plan import Planner
from flywheel.feedback.prediction_cache import PredictionCache
from flywheel.feedback.writer import Batch, StoreWriter, WorkerStats, by_kind
from flywheel.settings import Settings
from flywheel.store import (
    Outcome,
    Prediction,
    Score,
    insert_ignoring_duplicates,
    make_engine,
    session_factory,
    upgrade,
)

pytestmark = pytest.mark.integration
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Prepared:
    """What `ExampleBuilder.prepare` returns, as far as the writer reads it."""

    pair: JoinedPair
    row: Any = None
    variants: Any = None


class NoExamples:
    """An analysis that makes no examples: only the join and the attribution are tested."""

    def prepare(self, pairs: list[JoinedPair]) -> list[Prepared]:
        return [Prepared(p) for p in pairs]

    def finish(self, session, prepared) -> tuple[list[dict], list[Rejected], Counter]:
        return [], [], Counter()

    def count(self, session, outcomes) -> None:
        pass


class Letters:
    """The dead-letter topic, as a list."""

    def __init__(self) -> None:
        self.sent: list[Rejected] = []

    def publish(self, rejected) -> None:
        self.sent += rejected

    def close(self) -> None:
        pass


class Message:
    """The parts of a Kafka message the writer reads (to dead-letter one)."""

    def __init__(self, event: Any, offset: int) -> None:
        self.event, self._offset = event, offset

    def topic(self) -> str:
        return type(self.event).__name__

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        e = self.event
        return (e.id if isinstance(e, PredictionEvent) else e.prediction_id).encode()

    def value(self) -> bytes:
        return self.event.to_json()


class Store:
    """A `StoreWriter` on a migrated store, fed batches as the worker's store thread is."""

    def __init__(self, url: str, plan: bool) -> None:
        upgrade(url)
        self.engine = make_engine(url)
        settings = Settings(retention_every_s=0.0)  # no maintenance: the rows are months old
        observer = WorkerObserver()
        analysis = TimedAnalysis(NoExamples(), observer)  # type: ignore[arg-type]
        self.cache = PredictionCache(1000)
        self.stats = WorkerStats()
        self.writer = StoreWriter(
            settings.feedback, self.engine, analysis, self.cache, self.stats, observer
        )
        self.letters = Letters()
        self.writer.dead_letters = self.letters  # type: ignore[assignment]
        self.planner = (
            Planner(analysis, self.cache, copy=self.engine.dialect.name == "postgresql")
            if plan
            else None
        )
        self.offset = 0

    def write(self, *events: Any, doubtful: tuple[tuple[Any, Any], ...] = ()) -> Batch:
        """Store `events` as one batch; `doubtful`: (event, the batch's earlier one with its
        identity) pairs the consumer thread held back, as `Batch.doubtful`."""
        messages = []
        for e in events:
            messages.append((Message(e, self.offset), e))
            self.offset += 1
        held = []
        for e, earlier in doubtful:
            why = duplicate_reason(e, content_of(earlier), "came earlier in the batch")
            assert why is not None
            m = Message(e, self.offset)
            held.append((Rejected(m.topic(), 0, m.offset(), m.key(), m.value(), why), e))
            self.offset += 1
        batch = Batch(messages, [], {}, len(messages), doubtful=held)
        if self.planner is not None:
            batch.plan = self.planner.prepare(*by_kind(list(events)), batch)
        self.writer.store_batch(batch)
        if self.planner is not None:
            for stored in batch.stored:
                self.planner.committed(stored)
            self.planner.settled(batch)
        return batch

    def outcomes(self) -> dict[tuple[str, str], Outcome]:
        with session_factory(self.engine)() as session:
            return {(o.prediction_id, o.model_version): o for o in session.scalars(select(Outcome))}

    def table(self) -> list[tuple]:
        """Every outcome row, as plain values (to compare two stores or two moments)."""
        return sorted(
            (
                o.prediction_id,
                o.model_version,
                o.model_name,
                o.answered,
                o.label,
                o.predicted,
                o.correct,
                round(o.p_true, 12),
                round(o.log_loss, 12),
                round(o.confidence, 12),
                o.predicted_at,
                o.labelled_at,
            )
            for o in self.outcomes().values()
        )

    def scores(self) -> int:
        with session_factory(self.engine)() as session:
            return len(session.scalars(select(Score)).all())

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture(
    params=[("sqlite", True), ("sqlite", False), ("postgresql", True), ("postgresql", False)],
    ids=["sqlite-plan", "sqlite-general", "pg-plan", "pg-general"],
)
def store(request):
    db, plan = request.param
    url = request.getfixturevalue("sqlite_url" if db == "sqlite" else "pg_url")
    s = Store(url, plan)
    yield s
    s.close()


def prediction(pid: str, version: str = "1", p_yes: float = 0.7, at: datetime = T0):
    probs = {"no": round(1 - p_yes, 6), "yes": p_yes}
    return PredictionEvent(
        id=pid,
        model_name="m",
        model_version=version,
        features=[0.1, 0.2],
        probabilities=probs,
        label=max(probs, key=probs.get),  # type: ignore[arg-type]
        timestamp=at,
        latency_ms=1.0,
    )


def score(pid: str, version: str = "2", p_yes: float = 0.2, role: str = "shadow", at=None):
    probs = {"no": round(1 - p_yes, 6), "yes": p_yes}
    return ScoreEvent(
        prediction_id=pid,
        model_name="m",
        model_version=version,
        role=role,
        probabilities=probs,
        label=max(probs, key=probs.get),  # type: ignore[arg-type]
        timestamp=at or T0 + timedelta(milliseconds=5),
    )


def correction(pid: str, label: str = "yes", cid: str | None = None, minutes: int = 1):
    return CorrectionEvent(
        id=cid or f"c-{pid}",
        prediction_id=pid,
        label=label,
        source="app",
        timestamp=T0 + timedelta(minutes=minutes),
    )


def test_outcome_values_for_the_answering_and_the_scoring_version(store):
    store.write(prediction("p1", p_yes=0.7), score("p1", "2", p_yes=0.2), score("p1", "3", 0.0))
    assert store.outcomes() == {}  # no label yet
    store.write(correction("p1", "yes"))
    got = store.outcomes()
    assert set(got) == {("p1", "1"), ("p1", "2"), ("p1", "3")}
    a, s, zero = got["p1", "1"], got["p1", "2"], got["p1", "3"]
    assert (a.answered, a.predicted, a.correct, a.label) == (True, "yes", True, "yes")
    assert a.p_true == pytest.approx(0.7) and a.log_loss == pytest.approx(-math.log(0.7))
    assert a.confidence == pytest.approx(0.7)
    assert (s.answered, s.predicted, s.correct) == (False, "no", False)
    assert s.p_true == pytest.approx(0.2) and s.log_loss == pytest.approx(-math.log(0.2))
    assert s.confidence == pytest.approx(0.8)
    assert zero.p_true == 0.0 and zero.log_loss == pytest.approx(-math.log(1e-15))
    assert a.predicted_at == T0 and s.predicted_at == T0 + timedelta(milliseconds=5)
    assert a.labelled_at == s.labelled_at == T0 + timedelta(minutes=1)
    assert store.stats.outcomes == 3 and store.stats.scores == 2


def arrivals(order: str) -> list[list[Any]]:
    p, s, c = prediction("p1"), score("p1"), correction("p1")
    return {
        "score, correction": [[p], [s], [c]],
        "correction, score": [[p], [c], [s]],
        "late join": [[c], [s], [p]],  # the prediction after its correction and score
        "late join, score last": [[c], [p], [s]],
        "one batch": [[c, s, p]],
    }[order]


@pytest.mark.parametrize(
    "order",
    ["score, correction", "correction, score", "late join", "late join, score last", "one batch"],
)
def test_every_arrival_order_credits_each_version_once(store, order):
    for batch in arrivals(order):
        store.write(*batch)
    expected = [
        ("p1", "1", "m", True, "yes", "yes", True, 0.7, -math.log(0.7), 0.7),
        ("p1", "2", "m", False, "yes", "no", False, 0.2, -math.log(0.2), 0.8),
    ]
    rows = store.table()
    assert [r[:7] for r in rows] == [e[:7] for e in expected]
    for r, e in zip(rows, expected, strict=True):
        assert r[7:10] == pytest.approx(e[7:10])
    assert store.stats.outcomes == 2
    assert store.letters.sent == []


def test_replayed_events_write_no_second_outcome(store):
    events = [[prediction("p1")], [score("p1")], [correction("p1")], [score("p1", "3")]]
    for batch in events:
        store.write(*batch)
    first = store.table()
    assert len(first) == 3
    credited = store.stats.outcomes
    for batch in events + [[e for b in events for e in b]]:  # again, and all at once
        store.write(*batch)
    assert store.table() == first
    assert store.stats.outcomes == credited
    assert store.letters.sent == []  # the same content again is a redelivery


def test_a_conflicting_redelivered_score_is_dead_lettered(store):
    store.write(prediction("p1"), score("p1", p_yes=0.2))
    other = score("p1", p_yes=0.9)  # the same (prediction, version), other probabilities
    store.write(other)
    [letter] = store.letters.sent
    assert letter.reason.startswith("duplicate: score of prediction 'p1' by version '2'")
    assert "probabilities" in letter.reason
    store.write(correction("p1"))
    assert store.outcomes()["p1", "2"].p_true == pytest.approx(0.2)  # the first is kept


def test_a_redelivery_behind_a_conflicting_copy_in_its_batch_is_not_dead_lettered(store):
    """The original stored by an earlier batch; then a conflicting copy and a plain
    redelivery of the original share a batch, the copy first. Only the copy is a conflict:
    the redelivery is what the store holds. Before, the consumer thread judged it against
    the copy and dead-lettered it (seen once in CI, test_attribution_worker)."""
    store.write(prediction("p1"), score("p1", p_yes=0.2), correction("p1", label="yes"))
    copy, again = score("p1", p_yes=0.9), score("p1", p_yes=0.2)
    other, resent = correction("p1", label="no"), correction("p1", label="yes")
    store.write(copy, other, doubtful=((again, copy), (resent, other)))
    reasons = sorted(letter.reason for letter in store.letters.sent)
    assert len(reasons) == 2, reasons  # the copy and the other correction, nothing else
    assert all("is stored already" in r for r in reasons), reasons
    assert store.outcomes()["p1", "2"].p_true == pytest.approx(0.2)  # the first is kept
    # a held-back event that differs from what the store holds keeps its letter: here the
    # batch's first (p2 at 0.2) is what got stored
    first, later = score("p2", p_yes=0.2), score("p2", p_yes=0.6)
    store.write(prediction("p2"), first, doubtful=((later, first),))
    [letter] = store.letters.sent[2:]
    assert "came earlier in the batch" in letter.reason and "probabilities" in letter.reason


def test_a_second_correction_with_another_label_changes_nothing(store):
    store.write(prediction("p1"), score("p1"))
    store.write(correction("p1", "yes", cid="c1", minutes=1))
    before = store.table()
    store.write(correction("p1", "no", cid="c2", minutes=2))
    store.write(score("p1", "3"))  # a score after both: credited with the first label
    after = store.outcomes()
    assert [r for r in store.table() if r[1] != "3"] == before  # unchanged
    assert after["p1", "3"].label == "yes"
    assert after["p1", "3"].labelled_at == T0 + timedelta(minutes=1)
    assert len(after) == 3


def test_two_corrections_in_one_batch_credit_the_oldest(store):
    store.write(prediction("p1"), score("p1"))
    store.write(
        correction("p1", "no", cid="c2", minutes=2), correction("p1", "yes", cid="c1", minutes=1)
    )
    got = store.outcomes()
    assert {o.label for o in got.values()} == {"yes"}
    assert len(got) == 2


def test_the_sweep_credits_what_it_joins(store):
    store.write(correction("p1"), score("p1"))  # pending: the prediction is not stored
    with session_factory(store.engine).begin() as session:  # another worker stores it
        row = prediction("p1")
        insert_ignoring_duplicates(
            session,
            Prediction,
            [
                {
                    "id": row.id,
                    "model_name": row.model_name,
                    "model_version": row.model_version,
                    "features": row.features,
                    "probabilities": row.probabilities,
                    "label": row.label,
                    "created_at": row.timestamp,
                    "latency_ms": row.latency_ms,
                }
            ],
        )
    assert store.outcomes() == {}
    store.writer.sweep()
    assert set(store.outcomes()) == {("p1", "1"), ("p1", "2")}
    assert store.outcomes()["p1", "1"].predicted_at == T0


def test_many_predictions_take_the_bulk_paths(store):
    """Batches of 64+ rows: COPY on PostgreSQL (and the duplicate-skipping INSERT after a
    replay), with the outcomes' booleans."""
    ids = [f"p{i:03d}" for i in range(150)]
    preds = [prediction(i, p_yes=0.6 if n % 2 else 0.4) for n, i in enumerate(ids)]
    scores = [score(i, p_yes=0.55) for i in ids]
    corrections = [correction(i, "yes") for i in ids]
    store.write(*preds, *scores[:75])
    store.write(*corrections)
    store.write(*scores[75:])
    store.write(*preds, *scores, *corrections)  # a replay of everything
    got = store.outcomes()
    assert len(got) == 300
    assert sum(o.correct for o in got.values() if o.answered) == 75
    assert all(o.correct for o in got.values() if not o.answered)
    assert store.scores() == 150 and store.stats.outcomes == 300


def test_erasing_a_subject_deletes_the_outcomes_and_scores_of_its_predictions(store):
    from flywheel.store import erase_subject

    alice, bob = "a" * 64, "b" * 64
    store.write(*(prediction(p) for p in ("p1", "p2", "p3")))
    store.write(*(score(p) for p in ("p1", "p2", "p3")))
    store.write(
        correction("p1").model_copy(update={"subject": alice}),
        correction("p2").model_copy(update={"subject": bob}),
        correction("p3"),
    )
    assert len(store.outcomes()) == 6
    with session_factory(store.engine).begin() as session:
        receipt = erase_subject(session, alice, "test", T0)
    assert receipt.deleted["outcomes"] == 2 and receipt.deleted["scores"] == 1
    assert {k[0] for k in store.outcomes()} == {"p2", "p3"}
    assert store.scores() == 2
    with session_factory(store.engine).begin() as session:
        again = erase_subject(session, alice, "test", T0)
    assert again.deleted["outcomes"] == again.deleted["scores"] == 0


def test_retention_keeps_scores_with_predictions_and_outcomes_with_corrections(store):
    from flywheel.store import RetentionPolicy, apply_retention

    store.write(prediction("old", at=T0), score("old", at=T0))
    store.write(correction("old", minutes=1))
    later = T0 + timedelta(days=2)
    store.write(prediction("new", at=later), score("new", at=later))
    store.write(correction("new").model_copy(update={"timestamp": later}))
    policy = RetentionPolicy(
        predictions_s=86_400.0,  # a day: the old prediction and its score go
        corrections_s=3 * 86_400.0,  # three days: every outcome stays
        examples_s=1e9,
        error_counts_s=1e9,
        usage_s=1e9,
        partitions_ahead=0,
    )
    now = later + timedelta(hours=1)
    report = apply_retention(session_factory(store.engine), policy, now)
    assert report.removed["scores"] == 1 and report.removed["outcomes"] == 0
    assert store.scores() == 1 and len(store.outcomes()) == 4
    shorter = RetentionPolicy(**{**policy.__dict__, "corrections_s": 86_400.0})
    report = apply_retention(session_factory(store.engine), shorter, now)
    assert report.removed["outcomes"] == 2
    assert {k[0] for k in store.outcomes()} == {"new"}


def test_a_score_stored_while_another_worker_labels_its_prediction_is_credited_by_the_sweep(
    store,
):
    """Two workers' transactions at the same moment: one stores a score, the other joins
    the prediction's correction; neither sees the other's row, so neither writes the
    score's outcome. The worker that stored the score looks again from its sweep."""
    from flywheel.feedback.attribution import outcome_row

    store.write(prediction("p1"))
    store.write(score("p1"))  # not labelled as this transaction sees the store
    labelled = T0 + timedelta(minutes=1)
    with session_factory(store.engine).begin() as session:  # the other worker's join
        insert_ignoring_duplicates(
            session,
            Outcome,
            [
                outcome_row(
                    "p1",
                    "m",
                    "1",
                    answered=True,
                    probabilities={"no": 0.3, "yes": 0.7},
                    predicted="yes",
                    true_label="no",
                    predicted_at=T0,
                    labelled_at=labelled,
                )
            ],
        )
    assert set(store.outcomes()) == {("p1", "1")}
    store.writer.sweep()
    credited = store.outcomes()["p1", "2"]
    assert (credited.label, credited.labelled_at, credited.answered) == ("no", labelled, False)
    assert credited.correct is True and credited.p_true == pytest.approx(0.8)
    assert store.stats.outcomes == 1  # the sweep's row; the other worker wrote the first
    store.writer.sweep()  # nothing more to look at, nothing written again
    assert store.stats.outcomes == 1 and len(store.outcomes()) == 2
