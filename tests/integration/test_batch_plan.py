"""A batch prepared on the consumer thread (`plan`) stores and joins exactly what the
general path (`join.store_and_join`) does, on PostgreSQL and SQLite; a replay is refused
(`NotNew`) and nothing of it stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from flywheel.events import CorrectionEvent, PredictionEvent
from flywheel.feedback.examples import PreparedPair
from flywheel.feedback.join import JoinedPair, store_and_join
from flywheel.feedback.plan import NotNew, Planner, apply
from flywheel.feedback.prediction_cache import PredictionCache
from flywheel.store import Correction, Prediction, make_engine, session_factory, upgrade

pytestmark = pytest.mark.integration
T0 = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
NOW = T0 + timedelta(hours=1)


class Recorder:
    """An analysis that remembers which pairs it was asked to prepare, and where."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def prepare(self, pairs: list[JoinedPair]) -> list[PreparedPair]:
        self.calls.append([p.correction_id for p in pairs])
        return [PreparedPair(p, {"correction": p.correction_id}, None) for p in pairs]

    def finish(self, session, prepared):  # not used here
        raise AssertionError


def prediction(i: int) -> PredictionEvent:
    return PredictionEvent(
        id=f"p{i:03d}",
        model_name="m",
        model_version="2",
        features=[float(i), 0.5],
        probabilities={"a": 0.25, "b": 0.75},
        label="b",
        timestamp=T0,
        latency_ms=1.0,
    )


def correction(i: int, p: int, minutes: int = 0) -> CorrectionEvent:
    return CorrectionEvent(
        id=f"c{i:03d}",
        prediction_id=f"p{p:03d}",
        label="a",
        source="app" if i % 2 else None,
        timestamp=T0 + timedelta(minutes=minutes),
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


def state(session) -> tuple:
    return (
        sorted(session.scalars(select(Prediction.id))),
        sorted(session.execute(select(Correction.id, Correction.status)).all()),
    )


def scenario():
    """Batches: earlier predictions (stored, some cached); pending corrections; then a
    batch with new predictions, their pending corrections' claims, corrections of this
    batch, of cached and of uncached stored predictions, and one of an unknown one."""
    before = [prediction(i) for i in range(6)]
    waiting = [correction(100 + i, 10 + i, minutes=i) for i in range(3)]  # p010..p012 later
    batch_p = [prediction(10), prediction(11), prediction(12), prediction(13)]
    batch_c = [
        correction(1, 13, 5),
        correction(2, 0, 1),
        correction(3, 4, 2),
        correction(4, 99, 3),
        correction(5, 13, 5),
    ]
    return before, waiting, batch_p, batch_c


def test_a_prepared_batch_stores_and_joins_what_the_general_path_does(sessions):
    before, waiting, batch_p, batch_c = scenario()
    results = {}
    for way in ("plan", "general"):
        with sessions.begin() as s:  # start from the same store
            s.execute(Correction.__table__.delete())
            s.execute(Prediction.__table__.delete())
        cache = PredictionCache(100)
        analysis = Recorder()
        planner = Planner(analysis, cache)
        with sessions.begin() as s:
            planner.committed(store_and_join(s, before, [], NOW))
        cache._items.pop("p004")  # p004: stored, but no longer in memory
        with sessions.begin() as s:
            stored = store_and_join(s, [], waiting[:2], NOW)
            assert [c.id for c in stored.pending] == ["c100", "c101"]
            planner.committed(stored)  # c100, c101 now expected claims of p010, p011
        with sessions.begin() as s:  # c102 was stored by another worker: not expected
            store_and_join(s, [], waiting[2:], NOW)
        with sessions.begin() as s:
            if way == "plan":
                plan = planner.prepare(batch_p, batch_c)
                assert sorted(plan.prepared) == ["c001", "c002", "c005", "c100", "c101"]
                assert analysis.calls == [["c001", "c002", "c005", "c100", "c101"]]
                applied = apply(s, plan, analysis, NOW)
                # on the store thread, only what memory could not answer: c003 (p004 read
                # back from the store) and c102 (claimed, not expected)
                assert sorted(analysis.calls[1]) == ["c003", "c102"]
                stored, pairs = applied.stored, [pp.pair for pp in applied.prepared]
            else:
                stored = store_and_join(s, batch_p, batch_c, NOW, cache.get)
                pairs = stored.pairs
            results[way] = (
                state(s),
                pairs,
                [e.id for e in stored.new_predictions],
                stored.new_corrections,
                [c.id for c in stored.pending],
            )
    assert results["plan"] == results["general"]
    (predictions, corrections), pairs, new_p, new_c, pending = results["plan"]
    assert [p.correction_id for p in pairs] == [
        "c100",
        "c002",
        "c101",
        "c003",
        "c102",
        "c001",
        "c005",
    ]  # oldest first, then by id
    assert pending == ["c004"] and new_c == 5 and new_p == ["p010", "p011", "p012", "p013"]
    assert ("c004", "pending") in corrections and ("c102", "joined") in corrections
    assert pairs[3].features == [4.0, 0.5] and pairs[3].corrected_at.tzinfo is UTC


def test_a_replayed_batch_is_refused_and_leaves_nothing(sessions):
    before, _, batch_p, batch_c = scenario()
    planner = Planner(Recorder(), PredictionCache(100))
    with sessions.begin() as s:
        store_and_join(s, before + batch_p[:1], [], NOW)
    with sessions.begin() as s:
        after_first = state(s)
    plan = planner.prepare(batch_p, batch_c)  # p010 is stored already: a replay
    with pytest.raises(NotNew), sessions.begin() as s:
        apply(s, plan, Recorder(), NOW)
    with sessions() as s:
        assert state(s) == after_first
    with sessions.begin() as s:  # and so is a batch whose corrections were stored before
        store_and_join(s, [], batch_c[:1], NOW)
    plan = planner.prepare(batch_p[1:], batch_c)
    with pytest.raises(NotNew), sessions.begin() as s:
        apply(s, plan, Recorder(), NOW)


class InFlight:
    """A batch handed to the store thread: `whole` once its transaction stored it all."""

    def __init__(self) -> None:
        self.whole = False


def test_predictions_of_a_batch_in_flight_join_the_next_batch_if_it_was_stored_whole(sessions):
    before, _, batch_p, batch_c = scenario()
    planner = Planner(Recorder(), PredictionCache(100))
    first, second = InFlight(), InFlight()
    plan_p = planner.prepare(batch_p, [], first)
    plan_c = planner.prepare([], batch_c[:1], second)  # c001 -> p013, of `first`
    assert plan_c.relies_on == [first] and sorted(plan_c.prepared) == ["c001"]
    with pytest.raises(NotNew, match="relied on"), sessions.begin() as s:
        apply(s, plan_c, Recorder(), NOW)  # `first` is not stored (yet, or ever)
    with sessions.begin() as s:
        planner.committed(apply(s, plan_p, Recorder(), NOW).stored)
    first.whole = True
    planner.settled(first)
    with sessions.begin() as s:
        applied = apply(s, plan_c, Recorder(), NOW)
    assert [pp.pair.correction_id for pp in applied.prepared] == ["c001"]
    assert applied.stored.pending == []
    # settled: the next batch finds p013 in the cache, and relies on nothing
    later = planner.prepare([], batch_c[4:], InFlight())
    assert later.relies_on == [] and sorted(later.prepared) == ["c005"]
