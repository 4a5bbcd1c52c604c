"""The duplicate-skipping bulk inserts on tables keyed by two columns (`scores`, `outcomes`,
issue 28), on every PostgreSQL path and on SQLite: the new rows' keys come back as tuples,
a duplicate is skipped, and booleans are stored as the general path stores them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from flywheel.store import (
    Outcome,
    Score,
    insert_ignoring_duplicates,
    insert_returning_new,
    make_engine,
    session_factory,
    upgrade,
)
from flywheel.store.bulk import ROWS_BY_PATH

pytestmark = pytest.mark.integration
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


def outcome(pid: str, version: str, correct: bool) -> dict:
    return {
        "prediction_id": pid,
        "model_version": version,
        "model_name": "m",
        "answered": version == "1",
        "label": "yes",
        "predicted": "yes" if correct else "no",
        "correct": correct,
        "p_true": 0.75 if correct else 0.25,
        "log_loss": 0.2876820724517809 if correct else 1.3862943611198906,
        "confidence": 0.75,
        "predicted_at": T0,
        "labelled_at": T0 + timedelta(minutes=1),
    }


def score(pid: str, version: str) -> dict:
    return {
        "prediction_id": pid,
        "model_version": version,
        "model_name": "m",
        "role": "shadow",
        "probabilities": {"no": 0.25, "yes": 0.75},
        "label": "yes",
        "created_at": T0,
    }


@pytest.fixture(params=["sqlite", "copy", "columnar", "general"])
def session(request, use_insert_path):
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_url")
        use_insert_path(request.param)
    upgrade(url)
    engine = make_engine(url)
    with session_factory(engine)() as s:
        s.info["path"] = request.param
        yield s
    engine.dispose()


def test_new_keys_come_back_as_tuples_and_duplicates_are_skipped(session):
    path = session.info["path"]
    before = ROWS_BY_PATH[path]
    rows = [outcome(f"p{i}", v, i % 2 == 0) for i in range(3) for v in ("1", "2")]
    new = insert_returning_new(session, Outcome, rows)
    assert sorted(new) == sorted((r["prediction_id"], r["model_version"]) for r in rows)
    if path != "sqlite":
        assert ROWS_BY_PATH[path] - before == 6  # the path under test took every row
    again = insert_returning_new(session, Outcome, rows[:2] + [outcome("p9", "2", True)])
    assert again == [("p9", "2")]
    stored = {
        (o.prediction_id, o.model_version): (o.answered, o.correct)
        for o in session.scalars(select(Outcome))
    }
    assert stored == {
        **{(f"p{i}", v): (v == "1", i % 2 == 0) for i in range(3) for v in ("1", "2")},
        ("p9", "2"): (False, True),
    }
    scores = [score("p1", "2"), score("p1", "3")]
    assert insert_ignoring_duplicates(session, Score, scores) == 2
    assert insert_ignoring_duplicates(session, Score, scores) == 0
    assert sorted(insert_returning_new(session, Score, [score("p1", "3"), score("p2", "2")])) == [
        ("p2", "2")
    ]
