"""PostgreSQL's fast paths (COPY in a savepoint, the columnar bulk insert, the
update-with-join claim) store and return exactly what the general SQLAlchemy paths do,
and refuse the same values."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DataError, StatementError

import flywheel.store.bulk as bulk
from flywheel.events import CorrectionEvent, PredictionEvent
from flywheel.feedback.join import claim_joins, correction_row, prediction_row
from flywheel.store import (
    Correction,
    Example,
    LearnerState,
    Prediction,
    insert_ignoring_duplicates,
    insert_returning_new,
    make_engine,
    session_factory,
    upgrade,
)

pytestmark = pytest.mark.integration
T0 = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture()
def session(pg_url: str):
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with session_factory(engine)() as s:
        yield s
    engine.dispose()


def example_rows(prefix: str) -> list[dict]:
    features = [[0.1, -2.5e-7, 3.0, 1e300], [1, 2, 3, 4], [0.6877714395523071] * 4]
    labels = ['ünïcode "q" \\', "tab\tnew\nline\rcr \\N", "\\"]
    return [
        {
            "dedup_key": f"{prefix}{i}",
            "origin": "counterexample",
            "error_type": e,
            "parent_prediction_id": f"p{i}",
            "features": f,
            "label": label,
            "weight": w,
            "split": "train",
            "source": s,
            "created_at": (T0 + timedelta(hours=i)).astimezone(timezone(timedelta(hours=i))),
        }
        for i, (f, e, w, s, label) in enumerate(
            zip(
                features,
                ["novel", None, "boundary"],
                [0.5, 1, 2.0],
                [None, "app", "app"],
                labels,
                strict=True,
            )
        )
    ]


@pytest.fixture(params=["copy", "columnar"])
def fast_path(request, use_insert_path) -> str:
    """Which fast path the PostgreSQL inserts take (the other one turned off)."""
    use_insert_path(request.param)
    return request.param


def stored(session, prefix: str) -> list[tuple]:
    return [
        tuple(
            getattr(r, c)
            for c in (
                "origin",
                "error_type",
                "parent_prediction_id",
                "features",
                "label",
                "weight",
                "split",
                "source",
                "created_at",
            )
        )
        for r in session.scalars(
            select(Example).where(Example.dedup_key.like(f"{prefix}%")).order_by(Example.dedup_key)
        )
    ]


def test_fast_paths_store_what_the_general_path_stores(session, fast_path, use_insert_path):
    assert bulk._prepared_columns(Example.__table__, example_rows("a")) is not None
    assert insert_ignoring_duplicates(session, Example, example_rows("a")) == 3
    assert insert_ignoring_duplicates(session, Example, example_rows("a")[1:]) == 0
    use_insert_path("general")
    assert insert_ignoring_duplicates(session, Example, example_rows("b")) == 3
    session.commit()
    assert stored(session, "a") == stored(session, "b")
    ids = session.scalars(select(Example.id).order_by(Example.id)).all()
    assert ids == sorted(ids) and len(ids) == 6


def test_copy_is_taken_and_a_duplicate_falls_back_to_the_insert(session, monkeypatch):
    monkeypatch.setattr(bulk, "COPY_MIN_ROWS", 1)
    before = bulk.ROWS_BY_PATH.copy()

    def taken(path: str) -> int:  # rows `path` stored since the test began
        return bulk.ROWS_BY_PATH[path] - before[path]

    corrections = [
        {
            "id": f"k{i}",
            "prediction_id": "p",
            "label": "a\tb",
            "source": None,
            "created_at": T0,
            "status": "pending",
        }
        for i in range(3)
    ]
    assert insert_returning_new(session, Correction, corrections[:2]) == ["k0", "k1"]
    assert taken("copy") == 2  # COPY stored both
    assert insert_returning_new(session, Correction, corrections) == ["k2"]
    # k0 is there: COPY refused, its savepoint rolled back, an INSERT stored k2
    assert taken("copy") == 2 and taken("columnar") + taken("general") == 1
    assert insert_ignoring_duplicates(session, Correction, corrections) == 0
    assert insert_ignoring_duplicates(session, Example, example_rows("k")) == 3
    assert taken("copy") == 5
    session.commit()  # the transaction survived the refused COPY
    assert len(stored(session, "k")) == 3
    assert session.scalars(select(Correction.label)).all() == ["a\tb"] * 3


def test_defaults_and_duplicates_within_one_call(session):
    rows = [
        {"dedup_key": "d", "origin": "seed", "features": [1.0], "label": "a", "split": "train"}
    ] * 2  # no weight, no created_at: the models' defaults
    before = datetime.now(UTC)
    assert insert_ignoring_duplicates(session, Example, rows) == 1
    assert insert_ignoring_duplicates(session, LearnerState, [{"lineage": "x"}]) == 1
    session.commit()
    example = session.scalar(select(Example).where(Example.dedup_key == "d"))
    assert example.weight == 1.0 and example.created_at >= before - timedelta(seconds=1)
    assert session.get(LearnerState, "x").state == {}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"features": [math.nan]}, DataError),  # NaN is not JSON: refused, as before
        ({"created_at": datetime(2026, 1, 1)}, StatementError),  # naive: refused by the type
        ({"source": "x" * 65}, DataError),  # too long for VARCHAR(64)
    ],
)
def test_refuses_what_the_general_path_refuses(session, change, error, fast_path, use_insert_path):
    rows = [example_rows("r")[0] | change]
    with pytest.raises(error) as fast:
        insert_ignoring_duplicates(session, Example, rows)
    session.rollback()
    use_insert_path("general")
    with pytest.raises(error) as general:
        insert_ignoring_duplicates(session, Example, rows)
    session.rollback()
    assert type(fast.value.orig) is type(general.value.orig)


def test_unusual_rows_take_the_general_path(session):
    rows = example_rows("u")
    for unusual in (
        [rows[0], rows[1] | {"x": 1}],
        [rows[0], {k: v for k, v in rows[1].items() if k != "source"}],
        [rows[0] | {"weight": True}],
        [rows[0] | {"weight": math.inf}],
        [rows[0] | {"created_at": datetime(2026, 1, 1)}],
        [rows[0] | {"features": [1.0, math.nan]}],
    ):
        assert bulk._prepared_columns(Example.__table__, unusual) is None
        assert bulk._columnar_insert(Example.__table__, unusual) is None
        assert bulk._copy(session, Example.__table__, unusual * bulk.COPY_MIN_ROWS) is None
    assert (
        bulk._columnar_insert(LearnerState.__table__, [{"lineage": "l", "state": {1: "a"}}]) is None
    )


def test_none_in_a_json_column_is_json_null_on_every_path(session, fast_path, use_insert_path):
    assert (
        insert_ignoring_duplicates(
            session, Example, [example_rows("n")[0] | {"features": None, "dedup_key": "n1"}]
        )
        == 1
    )
    use_insert_path("general")
    assert (
        insert_ignoring_duplicates(
            session, Example, [example_rows("n")[0] | {"features": None, "dedup_key": "n2"}]
        )
        == 1
    )
    session.commit()
    assert stored(session, "n1") == stored(session, "n2")
    assert stored(session, "n1")[0][3] is None


def store_events(session, predictions, corrections) -> tuple[int, int]:
    """Both kinds stored as they arrive, every correction pending (nothing joined)."""
    return (
        insert_ignoring_duplicates(session, Prediction, map(prediction_row, predictions)),
        insert_ignoring_duplicates(
            session, Correction, [correction_row(c, False, T0) for c in corrections]
        ),
    )


def test_claim_on_postgresql_joins_each_pending_correction_once(session):
    predictions = [
        PredictionEvent(
            id=f"p{i}",
            model_name="m",
            model_version="3",
            features=[float(i), 0.5],
            label="b",
            probabilities={"a": 0.25, "b": 0.75},
            timestamp=T0,
            latency_ms=1.0,
        )
        for i in range(4)
    ]
    corrections = [
        CorrectionEvent(
            id=f"c{i}",
            prediction_id=f"p{i % 5}",
            label="a",
            source=None if i == 1 else "app",
            timestamp=T0 + timedelta(minutes=i),
        )
        for i in range(6)
    ]
    assert store_events(session, predictions[:3], corrections) == (3, 6)  # all pending
    now = T0 + timedelta(days=1)
    pairs = claim_joins(session, [f"p{i}" for i in range(5)], now)
    # c4 waits for p4 (never stored); c3 for p3 (stored next)
    assert [p.correction_id for p in pairs] == ["c0", "c1", "c2", "c5"]
    first = pairs[0]
    assert (
        first.prediction_id,
        first.true_label,
        first.source,
        first.model_name,
        first.model_version,
        first.features,
        first.probabilities,
        first.predicted,
    ) == ("p0", "a", "app", "m", "3", [0.0, 0.5], {"a": 0.25, "b": 0.75}, "b")
    assert pairs[1].source is None
    assert first.corrected_at == T0 and first.corrected_at.tzinfo is UTC
    assert claim_joins(session, ["p0", "p1", "p2"], now) == []  # never twice
    store_events(session, predictions[3:], [])
    assert [p.correction_id for p in claim_joins(session, ["p3"], now)] == ["c3"]
    session.commit()
    rows = session.execute(
        select(Correction.id, Correction.status, Correction.joined_at).order_by(Correction.id)
    ).all()
    assert [(r.id, r.status) for r in rows] == [
        ("c0", "joined"),
        ("c1", "joined"),
        ("c2", "joined"),
        ("c3", "joined"),
        ("c4", "pending"),
        ("c5", "joined"),
    ]
    assert all(r.joined_at == now for r in rows if r.status == "joined")
    assert session.scalar(select(Prediction.features).where(Prediction.id == "p1")) == [1.0, 0.5]


def test_rows_encoded_ahead_are_copied_with_the_rest(session, monkeypatch, use_insert_path):
    """Lines made on another thread for some rows; the others encoded at insert time."""
    monkeypatch.setattr(bulk, "COPY_MIN_ROWS", 1)
    rows = example_rows("e")
    ahead = bulk.EncodedRows.of(Example, rows[:2])
    assert ahead.line(rows[0]) is not None and ahead.line(dict(rows[0])) is None
    assert insert_ignoring_duplicates(session, Example, rows, ahead) == 3
    assert insert_ignoring_duplicates(session, Example, rows, ahead) == 0  # COPY refused
    use_insert_path("general")
    assert insert_ignoring_duplicates(session, Example, example_rows("g")) == 3
    session.commit()
    assert stored(session, "e") == stored(session, "g")
