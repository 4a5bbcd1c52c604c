"""Store lifecycle (issue 30): retention, day partitions, the migration of a filled store,
the maintenance claim, `flywheel db maintain` -- on real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, text

from flywheel.events import CorrectionEvent, PredictionEvent
from flywheel.feedback.join import store_and_join
from flywheel.store import (
    Correction,
    CounterexampleUsage,
    ErrorCount,
    Example,
    Prediction,
    RetentionPolicy,
    apply_retention,
    downgrade,
    is_partitioned,
    maintain,
    make_engine,
    session_factory,
    table_sizes,
    upgrade,
)

pytestmark = pytest.mark.integration

DAY = 86_400.0
WEEK = 7 * DAY
POLICY = RetentionPolicy(
    predictions_s=8 * DAY,
    corrections_s=30 * DAY,
    examples_s=90 * DAY,
    error_counts_s=365 * DAY,
    usage_s=3600.0,
    partitions_ahead=3,
    every_s=3600.0,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def _prediction(pid: str, at: datetime) -> PredictionEvent:
    return PredictionEvent(
        id=pid,
        model_name="m",
        model_version="1",
        features=[1.0, 2.0],
        probabilities={"a": 0.7, "b": 0.3},
        label="a",
        timestamp=at,
        latency_ms=0.5,
    )


def _correction(cid: str, pid: str, at: datetime) -> CorrectionEvent:
    return CorrectionEvent(id=cid, prediction_id=pid, label="b", source="app", timestamp=at)


def _write(url: str, predictions=(), corrections=(), now: datetime | None = None):
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            return store_and_join(
                session, list(predictions), list(corrections), now or datetime.now(UTC)
            )
    finally:
        engine.dispose()


def _ids(url: str, model, column) -> set:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(column)).scalars())
    finally:
        engine.dispose()


def _apply(url: str, now: datetime, policy: RetentionPolicy = POLICY):
    engine = make_engine(url)
    try:
        return apply_retention(session_factory(engine), policy, now)
    finally:
        engine.dispose()


def _noon_today() -> datetime:
    return datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)


def test_predictions_kept_for_their_window_then_dropped(db_url: str) -> None:
    """A prediction is kept its whole window -- a correction arriving one second before it
    ends still joins -- and dropped after (PostgreSQL: once its whole day is past)."""
    upgrade(db_url)
    t0 = _noon_today()
    window = timedelta(seconds=POLICY.predictions_s)
    _write(db_url, [_prediction("edge", t0), _prediction("young", t0 + timedelta(hours=6))])

    last_second = t0 + window - timedelta(seconds=1)
    report = _apply(db_url, last_second)
    assert report.removed["predictions"] == 0
    late = _write(db_url, corrections=[_correction("c-edge", "edge", last_second)])
    assert [p.prediction_id for p in late.pairs] == ["edge"] and not late.pending

    partitioned = db_url.startswith("postgresql")
    _apply(db_url, t0 + window + timedelta(seconds=1))
    left = _ids(db_url, Prediction, Prediction.id)
    if partitioned:  # its day partition also holds `young`: the day goes when all of it is past
        assert left == {"edge", "young"}
        end_of_day = t0.replace(hour=0) + timedelta(days=1)
        _apply(db_url, end_of_day + window - timedelta(seconds=1))
        assert _ids(db_url, Prediction, Prediction.id) == {"edge", "young"}
        report = _apply(db_url, end_of_day + window)
        assert f"predictions_p{t0:%Y%m%d}" in report.dropped
        assert _ids(db_url, Prediction, Prediction.id) == set()
    else:
        assert left == {"young"}
        _apply(db_url, t0 + timedelta(hours=6) + window + timedelta(seconds=1))
        assert _ids(db_url, Prediction, Prediction.id) == set()
    # the joined correction outlives its prediction (its own retention), and a redelivery
    # of it is still a no-op
    assert _ids(db_url, Correction, Correction.id) == {"c-edge"}
    again = _write(db_url, corrections=[_correction("c-edge", "edge", last_second)])
    assert again.new_corrections == 0 and not again.pairs


def test_retention_of_the_other_tables(db_url: str) -> None:
    """Each table loses exactly its rows past their window; a pending correction, seed
    examples and the privacy ledger are never deleted by time."""
    upgrade(db_url)
    now = _noon_today()
    old, recent = now - timedelta(days=400), now - timedelta(hours=1)
    _write(db_url, corrections=[_correction("pending-old", "never-seen", old)])
    _write(db_url, [_prediction("p-old", old), _prediction("p-new", recent)])
    _write(
        db_url,
        corrections=[
            _correction("joined-old", "p-old", old),
            _correction("joined-new", "p-new", recent),
        ],
        now=old,
    )
    engine = make_engine(db_url)
    try:
        with session_factory(engine).begin() as session:
            for key, origin, at in [
                ("seed-old", "seed", old),
                ("corr-old", "correction", old),
                ("corr-new", "correction", recent),
                ("ce-old", "counterexample", now - timedelta(days=91)),
                ("ce-keep", "counterexample", now - timedelta(days=89)),
            ]:
                session.add(
                    Example(
                        dedup_key=key,
                        origin=origin,
                        features=[1.0],
                        label="a",
                        split="train",
                        source="app",
                        created_at=at,
                    )
                )
            for hour in (now - timedelta(days=366), now - timedelta(days=364)):
                session.add(
                    ErrorCount(
                        model_name="m",
                        model_version="1",
                        hour=hour.replace(minute=0),
                        predicted="a",
                        actual="b",
                        outcome="confident",
                        count=3,
                    )
                )
        with session_factory(engine).begin() as session:  # a minute past the window, one in it
            session.execute(delete(CounterexampleUsage))
            session.add(CounterexampleUsage(source="app", minute=now - timedelta(hours=2), count=1))
            session.add(CounterexampleUsage(source="other", minute=now, count=1))
    finally:
        engine.dispose()

    report = _apply(db_url, now)
    assert _ids(db_url, Correction, Correction.id) == {"pending-old", "joined-new"}
    assert _ids(db_url, Example, Example.dedup_key) == {"seed-old", "corr-new", "ce-keep"}
    assert _ids(db_url, ErrorCount, ErrorCount.hour) == {
        (now - timedelta(days=364)).replace(minute=0)
    }
    assert _ids(db_url, CounterexampleUsage, CounterexampleUsage.source) == {"other"}
    assert report.removed["corrections"] == 1 and report.removed["examples"] == 2
    # the pending correction still joins when its prediction comes
    late = _write(db_url, [_prediction("never-seen", now)])
    assert [p.correction_id for p in late.pairs] == ["pending-old"]


def test_partitions_across_a_month_boundary(pg_url: str) -> None:
    """Maintenance makes the days ahead across a month end; a row of a day without its
    partition waits in the future catch-all and moves into the day's partition when it is made;
    retention drops whole days only."""
    upgrade(pg_url)
    jan30 = datetime(2027, 1, 30, 9, tzinfo=UTC)
    report = _apply(pg_url, jan30)
    for day in ("20270130", "20270131", "20270201", "20270202"):
        assert f"predictions_p{day}" in report.created
    _write(
        pg_url,
        [
            _prediction("feb1", datetime(2027, 2, 1, 23, 59, 59, tzinfo=UTC)),
            _prediction("jan31", datetime(2027, 1, 31, 0, 0, tzinfo=UTC)),
            _prediction("feb5", datetime(2027, 2, 5, 12, tzinfo=UTC)),
        ],
    )
    assert _where(pg_url) == {
        "feb1": "predictions_p20270201",
        "jan31": "predictions_p20270131",
        "feb5": "predictions_future",
    }
    report = _apply(pg_url, datetime(2027, 2, 3, tzinfo=UTC))
    assert "predictions_p20270205" in report.created
    assert _where(pg_url)["feb5"] == "predictions_p20270205"
    # Feb 9 00:00 + 8 days: Jan 31 and every earlier day are past, Feb 1 is not
    report = _apply(pg_url, datetime(2027, 2, 9, tzinfo=UTC))
    assert "predictions_p20270131" in report.dropped
    assert "predictions_p20270201" not in report.dropped
    assert set(_where(pg_url)) == {"feb1", "feb5"}
    report = _apply(pg_url, datetime(2027, 2, 10, tzinfo=UTC))
    assert report.dropped == ["predictions_p20270201"]
    assert set(_where(pg_url)) == {"feb5"}


def _where(url: str) -> dict[str, str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, tableoid::regclass::text FROM predictions"))
            return dict(rows.all())
    finally:
        engine.dispose()


@pytest.mark.parametrize("n", [3, 200])  # the INSERT path, the COPY path
def test_redelivered_predictions_stored_once_across_partitions(pg_url: str, n: int) -> None:
    """With the key (id, created_at) a redelivery still hits the key and is skipped, by
    both insert paths, and its correction joins once."""
    upgrade(pg_url)
    t0 = _noon_today()
    batch = [_prediction(f"p{i}", t0 + timedelta(hours=9 * (i % 4))) for i in range(n)]
    first = _write(pg_url, batch, [_correction("c1", "p1", t0)])
    again = _write(pg_url, batch, [_correction("c1", "p1", t0)])
    assert len(first.new_predictions) == n and again.new_predictions == []
    assert len(first.pairs) == 1 and again.pairs == [] and again.conflicts == []
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert is_partitioned(conn, "predictions")
            count, distinct = conn.execute(
                select(func.count(), func.count(func.distinct(Prediction.id)))
            ).one()
            parts = conn.execute(
                text("SELECT count(DISTINCT tableoid) FROM predictions")
            ).scalar_one()
    finally:
        engine.dispose()
    assert count == distinct == n
    assert parts > 1  # the rows really are spread over day partitions


def test_migration_moves_a_filled_store(db_url: str) -> None:
    """A store filled by the code before 0012 (rows over 40 days, joined and pending
    corrections) keeps every row through the upgrade and the downgrade, and joins after."""
    upgrade(db_url, "0010")
    now = datetime.now(UTC)
    days = [now - timedelta(days=d, minutes=d) for d in range(0, 40, 3)]
    predictions = [_prediction(f"p{i}", at) for i, at in enumerate(days)]
    _write(db_url, predictions, [_correction("c0", "p0", now)])
    _write(db_url, corrections=[_correction("c-wait", "later", now)])
    before = _rows(db_url)

    upgrade(db_url)
    assert _rows(db_url) == before
    if db_url.startswith("postgresql"):
        where = _where(db_url)
        assert len(set(where.values())) == len(days)  # a day each, none in a catch-all
        assert not {"predictions_past", "predictions_future"} & set(where.values())
    late = _write(db_url, [_prediction("later", now)])
    assert [p.correction_id for p in late.pairs] == ["c-wait"]
    again = _write(db_url, predictions)  # redelivered after the migration: still no-ops
    assert again.new_predictions == []

    after = _rows(db_url)
    downgrade(db_url, "0010")
    assert _rows(db_url) == after
    upgrade(db_url)
    assert _rows(db_url) == after


def _rows(url: str) -> tuple[list, list]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            preds = conn.execute(
                select(
                    Prediction.id,
                    Prediction.created_at,
                    Prediction.features,
                    Prediction.probabilities,
                    Prediction.label,
                    Prediction.stored_at,
                ).order_by(Prediction.id)
            ).all()
            corrections = conn.execute(
                select(Correction.id, Correction.status).order_by(Correction.id)
            ).all()
            return [tuple(r) for r in preds], [tuple(r) for r in corrections]
    finally:
        engine.dispose()


def test_one_maintenance_run_per_interval(db_url: str) -> None:
    """Of workers asking at once, one runs; the next run is due `every_s` later; the CLI's
    forced run runs anyway."""
    upgrade(db_url)
    now = _noon_today()
    engine = make_engine(db_url)
    results: list[object] = []
    try:
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(maintain(engine, POLICY, owner=f"w{i}", now=now))
            )
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 4
        assert sum(r is not None for r in results) == 1
        soon = now + timedelta(seconds=POLICY.every_s - 1)
        assert maintain(engine, POLICY, owner="w0", now=soon) is None
        assert maintain(engine, POLICY, owner="cli", now=soon, force=True) is not None
        later = soon + timedelta(seconds=POLICY.every_s)
        assert maintain(engine, POLICY, owner="w1", now=later) is not None
    finally:
        engine.dispose()


def test_cli_maintain_and_sizes(db_url: str, tmp_path: Path) -> None:
    upgrade(db_url)
    t0 = datetime.now(UTC) - timedelta(days=20)
    _write(db_url, [_prediction("gone", t0), _prediction("kept", datetime.now(UTC))])
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(tmp_path),
        "FLYWHEEL_DATABASE_URL": db_url,
        "FLYWHEEL_RETENTION_PREDICTIONS_S": str(POLICY.predictions_s),
    }
    run = subprocess.run(
        [sys.executable, "-m", "flywheel", "db", "maintain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "predictions 1" in run.stdout
    assert _ids(db_url, Prediction, Prediction.id) == {"kept"}
    shown = subprocess.run(
        [sys.executable, "-m", "flywheel", "db", "current"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr
    assert "predictions: " in shown.stdout and "examples: " in shown.stdout
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            sizes = {s.table: s for s in table_sizes(conn, ["predictions", "corrections"])}
    finally:
        engine.dispose()
    if db_url.startswith("postgresql"):
        assert sizes["predictions"].partitions >= 4 and (sizes["predictions"].bytes or 0) > 0
    else:
        assert sizes["predictions"].rows == 1


def test_a_forged_prediction_under_a_stored_id_joins_once(pg_url: str) -> None:
    """The one case the key (id, created_at) lets through: another event under a stored id
    with another timestamp (not a redelivery: ids are minted once, with their time). It is
    stored beside the first, in its own day's partition; a correction of that id still
    joins exactly once (the correction's status change decides), with the newest row."""
    upgrade(pg_url)
    t0 = _noon_today()
    _write(pg_url, [_prediction("p", t0)])
    forged = _prediction("p", t0 + timedelta(days=1)).model_copy(update={"label": "b"})
    _write(pg_url, [forged])
    assert len(_where(pg_url)) == 1  # one id...
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Prediction)).scalar_one() == 2
    finally:
        engine.dispose()
    first = _write(pg_url, corrections=[_correction("c", "p", t0)])
    again = _write(pg_url, corrections=[_correction("c", "p", t0)])
    assert [p.predicted for p in first.pairs] == ["b"] and again.pairs == []
