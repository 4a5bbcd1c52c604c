"""Training-store models on SQLite: round trips, idempotent writes, CHECK constraints."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from flywheel.store import (
    CORRECTION_STATUSES,
    ERROR_TYPES,
    ORIGINS,
    SPLITS,
    Base,
    Correction,
    CorrectionStatus,
    Example,
    LearnerState,
    Origin,
    Prediction,
    SchemaNotCurrent,
    Split,
    check_schema,
    display_url,
    insert_ignoring_duplicates,
    make_engine,
    normalize_url,
    session_factory,
)

T0 = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as session:
        yield session


def _example(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "dedup_key": "seed:1",
        "origin": Origin.SEED,
        "features": [0.5, -1.25, 3.0],
        "label": "cat",
        "split": Split.TRAIN,
    }
    return row | overrides


def test_allowed_values_are_exported() -> None:
    assert ORIGINS == ("seed", "correction", "counterexample", "manual")
    assert SPLITS == ("train", "holdout", "quarantine")
    assert ERROR_TYPES == ("confident", "boundary", "novel", "suspect")
    assert CORRECTION_STATUSES == ("pending", "joined", "expired")


def test_prediction_round_trip(session: Session) -> None:
    session.add(
        Prediction(
            id="p1",
            model_name="flywheel",
            model_version="3",
            features=[1.0, 2.5],
            probabilities={"cat": 0.75, "dog": 0.25},
            label="cat",
            created_at=T0,
            latency_ms=1.5,
        )
    )
    session.commit()
    session.expunge_all()

    got = session.get(Prediction, "p1")
    assert got is not None
    assert (got.model_name, got.model_version, got.label) == ("flywheel", "3", "cat")
    assert got.features == [1.0, 2.5]
    assert got.probabilities == {"cat": 0.75, "dog": 0.25}
    assert got.latency_ms == 1.5
    assert got.created_at == T0 and got.created_at.tzinfo is not None
    assert got.stored_at.tzinfo is not None  # server default, read back as aware UTC
    assert abs(got.stored_at - datetime.now(UTC)) < timedelta(minutes=5)


def test_times_are_stored_as_utc(session: Session) -> None:
    plus_two = datetime(2025, 3, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    session.add(Correction(id="c1", prediction_id="p1", label="dog", created_at=plus_two))
    session.commit()
    session.expunge_all()

    got = session.get(Correction, "c1")
    assert got is not None
    assert got.created_at == plus_two and got.created_at.utcoffset() == timedelta(0)
    assert got.status == CorrectionStatus.PENDING and got.joined_at is None


def test_naive_datetimes_are_rejected(session: Session) -> None:
    session.add(
        Correction(id="c1", prediction_id="p1", label="dog", created_at=datetime(2025, 3, 1, 12, 0))
    )
    with pytest.raises(StatementError, match="naive datetime"):
        session.commit()


def test_example_defaults_and_growing_ids(session: Session) -> None:
    first = Example(**_example(dedup_key="a"))
    second = Example(
        **_example(
            dedup_key="b",
            origin=Origin.CORRECTION,
            error_type="confident",
            parent_prediction_id="p1",
            weight=2.0,
            source="client-1",
        )
    )
    session.add_all([first, second])
    session.commit()
    assert first.id < second.id
    assert first.weight == 1.0 and first.error_type is None
    assert first.created_at.tzinfo is not None

    # Learners keep a cursor on ids, so a deleted newest id must never come back.
    session.execute(delete(Example).where(Example.id == second.id))
    session.commit()
    third = Example(**_example(dedup_key="c"))
    session.add(third)
    session.commit()
    assert third.id > second.id


def test_learner_state_round_trip(session: Session) -> None:
    session.add(LearnerState(lineage="flywheel/online"))
    session.commit()
    state = session.get(LearnerState, "flywheel/online")
    assert state is not None
    assert (state.cursor, state.state) == (0, {})

    before = state.updated_at
    state.cursor, state.state = 42, {"optimizer": {"lr": 0.01}, "seen": [1, 2]}
    session.commit()
    session.expunge_all()
    state = session.get(LearnerState, "flywheel/online")
    assert state is not None
    assert state.cursor == 42 and state.state == {"optimizer": {"lr": 0.01}, "seen": [1, 2]}
    assert state.updated_at >= before


def test_duplicate_dedup_key_is_refused(session: Session) -> None:
    session.add(Example(**_example()))
    session.commit()
    session.add(Example(**_example(label="dog")))
    with pytest.raises(IntegrityError, match="UNIQUE"):
        session.commit()


def test_insert_ignoring_duplicates_makes_rewrites_harmless(session: Session) -> None:
    rows = [_example(dedup_key=f"seed:{i}") for i in range(3)]
    assert insert_ignoring_duplicates(session, Example, rows) == 3
    assert insert_ignoring_duplicates(session, Example, rows + [_example(dedup_key="new")]) == 1
    assert insert_ignoring_duplicates(session, Example, []) == 0
    session.commit()
    keys = session.scalars(select(Example.dedup_key).order_by(Example.id)).all()
    assert keys == ["seed:0", "seed:1", "seed:2", "new"]

    correction = {"id": "c1", "prediction_id": "p1", "label": "dog", "created_at": T0}
    assert insert_ignoring_duplicates(session, Correction, [correction]) == 1
    assert insert_ignoring_duplicates(session, Correction, [correction | {"label": "x"}]) == 0
    session.commit()
    assert session.scalars(select(Correction.label)).all() == ["dog"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("origin", "scraped"),
        ("split", "test"),
        ("error_type", "weird"),
        ("weight", 0.0),
        ("weight", -1.0),
    ],
)
def test_check_constraints_reject_bad_examples(session: Session, field: str, value: Any) -> None:
    session.add(Example(**_example(**{field: value})))
    with pytest.raises(IntegrityError, match="CHECK constraint"):
        session.commit()


def test_check_constraint_rejects_bad_correction_status(session: Session) -> None:
    session.add(Correction(id="c1", prediction_id="p1", label="dog", created_at=T0, status="lost"))
    with pytest.raises(IntegrityError, match="CHECK constraint"):
        session.commit()


@pytest.mark.parametrize("value", ERROR_TYPES)
def test_every_allowed_error_type_is_accepted(session: Session, value: str) -> None:
    session.add(Example(**_example(error_type=value, origin=Origin.COUNTEREXAMPLE)))
    session.commit()


def test_sqlite_connections_are_configured(engine: Engine) -> None:
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_postgresql_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u:pw@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    shown = display_url("postgresql://u:s3cret@h:5432/db")
    assert "s3cret" not in shown and shown == "postgresql+psycopg://u:***@h:5432/db"


def test_tables_without_a_revision_are_not_a_flywheel_schema(engine: Engine) -> None:
    # create_all is for tests only: a store must be created by migrations to be opened.
    with pytest.raises(SchemaNotCurrent, match="has no Flywheel schema.*flywheel db upgrade"):
        check_schema(engine)
