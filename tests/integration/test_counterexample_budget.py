"""The per-source counterexample budget on real SQLite and PostgreSQL: the store counts
what each insert actually stored (migration 0006's trigger), per source and minute, and
the budget check reads a window of those minutes."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sqlalchemy import select, text

from flywheel.feedback.examples import ExampleBuilder
from flywheel.feedback.join import JoinedPair
from flywheel.feedback.reference import ReferenceStats
from flywheel.feedback.reference_data import LabelledPool
from flywheel.settings import FeedbackSettings
from flywheel.store import (
    CounterexampleUsage,
    Example,
    insert_ignoring_duplicates,
    make_engine,
    session_factory,
    upgrade,
)
from flywheel.streams import Concept

pytestmark = pytest.mark.integration
T0 = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
MINUTE = T0.replace(second=0, microsecond=0)


@pytest.fixture(params=["sqlite", "postgresql-copy", "postgresql-columnar", "postgresql-general"])
def session(request, use_insert_path):
    """A migrated store; on PostgreSQL, inserts take one path (the others turned off)."""
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_url")
        use_insert_path(request.param.removeprefix("postgresql-"))
    upgrade(url)
    engine = make_engine(url)
    with session_factory(engine)() as s:
        yield s
    engine.dispose()


def rows(
    keys: list[str], source: str | None, at: datetime = T0, origin: str = "counterexample"
) -> list[dict]:
    return [
        {
            "dedup_key": k,
            "origin": origin,
            "error_type": "confident",
            "parent_prediction_id": "p",
            "features": [0.5, 1.5],
            "label": "a",
            "weight": 0.5,
            "split": "train",
            "source": source,
            "created_at": at,
        }
        for k in keys
    ]


def usage(session) -> dict[tuple[str, datetime], int]:
    return {(u.source, u.minute): u.count for u in session.scalars(select(CounterexampleUsage))}


def test_each_source_minute_counts_the_counterexamples_stored(session):
    batch = (
        rows(["a1", "a2", "a3"], "app-a")
        + rows(["n1"], None)
        + rows(["a4"], "app-a", T0 + timedelta(seconds=50))  # the next minute
        + rows(["c1", "c2"], "app-a", origin="correction")
    )  # not counterexamples
    assert insert_ignoring_duplicates(session, Example, batch) == 7
    session.commit()
    assert usage(session) == {
        ("app-a", MINUTE): 3,
        ("", MINUTE): 1,
        ("app-a", MINUTE + timedelta(minutes=1)): 1,
    }

    # a replay stores nothing and counts nothing; a batch with some rows already stored
    # counts only the new ones
    assert insert_ignoring_duplicates(session, Example, batch) == 0
    assert (
        insert_ignoring_duplicates(
            session, Example, rows(["a1", "a5", "b1"], "app-a") + rows(["b2"], "app-b")
        )
        == 3
    )
    session.commit()
    assert usage(session) == {
        ("app-a", MINUTE): 5,
        ("", MINUTE): 1,
        ("app-b", MINUTE): 1,
        ("app-a", MINUTE + timedelta(minutes=1)): 1,
    }


def test_a_rolled_back_insert_takes_its_counts_with_it(session):
    assert insert_ignoring_duplicates(session, Example, rows(["a1", "a2"], "app-a")) == 2
    session.rollback()
    assert usage(session) == {}
    assert session.scalar(select(Example.id)) is None


@pytest.mark.parametrize("window_s", [3600.0, 90.0])
def test_the_budget_counts_a_window_of_whole_minutes(session, window_s):
    now = T0
    start = (now - timedelta(seconds=window_s)).replace(second=0, microsecond=0)
    insert_ignoring_duplicates(
        session,
        Example,
        (
            rows([f"in{i}" for i in range(4)], "app-a", now - timedelta(seconds=1))
            + rows(["edge"], "app-a", start + timedelta(seconds=59))  # before now - window
            + rows(["old"], "app-a", start - timedelta(seconds=1))  # the minute before: out
            + rows(["b1", "b2"], "app-b")
            + rows(["n1"], None)
            + rows(["ok"], "app-c", origin="correction")
        ),
    )
    session.commit()
    stand_in = SimpleNamespace(
        feedback=FeedbackSettings(counterexample_budget=10, counterexample_window_s=window_s)
    )
    left = ExampleBuilder.budget_left(stand_in, session, {"app-a", "app-b", "app-c", None}, now)
    assert left == {"app-a": 5, "app-b": 8, "app-c": 10, None: 9}


def test_the_migration_counts_what_was_stored_before_it(request):
    url = request.getfixturevalue("pg_url")
    upgrade(url, "0005")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for key, source, at in (
                ("x1", "app-a", T0),
                ("x2", "app-a", T0),
                ("x3", None, T0 + timedelta(minutes=5)),
            ):
                conn.execute(
                    text(
                        "INSERT INTO examples (dedup_key, origin, features, label, split, source,"
                        " created_at) VALUES (:k, 'counterexample', '[1.0]', 'a', 'train', :s,"
                        " :t)"
                    ),
                    {"k": key, "s": source, "t": at},
                )
        upgrade(url)
        with session_factory(engine)() as s:
            assert usage(s) == {("app-a", MINUTE): 2, ("", MINUTE + timedelta(minutes=5)): 1}
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def builder_parts(seed_model):
    """The seed model, its labelled pool, and its predictions on a drifted concept (many
    of them wrong, so their corrections want counterexamples)."""
    settings, spec, module = seed_model.settings, seed_model.spec, seed_model.module
    x_tr = seed_model.x_tr.astype(np.float64)
    pool = LabelledPool(ReferenceStats.from_examples(x_tr))
    pool.add(x_tr.tolist(), [spec.labels[i] for i in seed_model.y_tr])
    x, truth = Concept(settings.seed + 1).sample(200, 5)
    with torch.inference_mode():
        probs = torch.softmax(module(torch.from_numpy(x)), 1).numpy().tolist()
    pairs = []
    for i, (features, p, t) in enumerate(zip(x.tolist(), probs, truth, strict=True)):
        pd = dict(zip(spec.labels, p, strict=True))
        pairs.append(
            JoinedPair(
                uuid.UUID(int=i).hex,
                uuid.UUID(int=10_000 + i).hex,
                t,
                "app-a",
                T0,
                "flywheel",
                "1",
                features,
                pd,
                max(pd, key=pd.get),
            )
        )
    return settings, spec, module, pool, pairs


def test_concurrent_workers_share_one_source_budget(pg_url, builder_parts, wait_for_lock_wait):
    """Two transactions spend the same source's budget at once: the second reads what is
    left only after the first commits, so together they store the budget, not twice it.
    A transaction for another source does not wait."""
    settings, spec, module, pool, pairs = builder_parts
    budget = 7
    feedback = settings.feedback.model_copy(update={"counterexample_budget": budget})
    builder = ExampleBuilder(feedback, pool, lambda version: (spec.labels, module))
    first, second = builder.prepare(pairs[:100]), builder.prepare(pairs[100:])
    other = builder.prepare(
        [
            p._replace(
                source="app-b",
                correction_id=f"b{p.correction_id}",
                prediction_id=f"b{p.prediction_id}",
            )
            for p in pairs[:20]
        ]
    )
    assert all(sum(len(pp.variants or ()) for pp in half) > budget for half in (first, second))
    upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    spent: dict[str, int] = {}
    errors: list[BaseException] = []

    def spend(name: str, prepared) -> None:
        try:
            with sessions.begin() as s:
                rows, _, _ = builder.finish(s, prepared)
                spent[name] = sum(r["origin"] == "counterexample" for r in rows)
                insert_ignoring_duplicates(s, Example, rows)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    try:
        with sessions() as a:
            rows, _, _ = builder.finish(a, first)
            assert sum(r["origin"] == "counterexample" for r in rows) == budget
            insert_ignoring_duplicates(a, Example, rows)
            unrelated = threading.Thread(target=spend, args=("other", other))
            unrelated.start()
            unrelated.join(30)  # while `a` holds app-a's budget
            assert not unrelated.is_alive() and spent["other"] == budget
            blocked = threading.Thread(target=spend, args=("second", second))
            blocked.start()
            wait_for_lock_wait(sessions)
            assert "second" not in spent
            a.commit()
        blocked.join(30)
        assert not blocked.is_alive() and errors == []
        assert spent["second"] == 0
        with sessions() as s:
            assert {u.source: u.count for u in s.scalars(select(CounterexampleUsage))} == {
                "app-a": budget,
                "app-b": budget,
            }
    finally:
        engine.dispose()
