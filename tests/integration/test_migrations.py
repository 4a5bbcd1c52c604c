"""Migrations on real SQLite and PostgreSQL databases, through the API and the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from flywheel.store import (
    Base,
    Example,
    SchemaNotCurrent,
    SchemaTooNew,
    check_schema,
    current,
    downgrade,
    head,
    insert_ignoring_duplicates,
    is_partition,
    known_revisions,
    make_engine,
    open_store,
    session_factory,
    upgrade,
)
from tests.deadlines import deadline

pytestmark = pytest.mark.integration

TABLES = {
    "predictions",
    "corrections",
    "examples",
    "learner_state",
    "learner_leases",
    "reference_stats",
    "trusted_sets",
    "error_counts",
    "counterexample_usage",
    "privacy_ledger",
    "privacy_source_spend",
    "apps",
    "app_keys",
    "erasure_receipts",
    "scores",
    "outcomes",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        names = set(inspect(engine).get_table_names()) - {"alembic_version"}
        return {n for n in names if not is_partition(n)}  # PostgreSQL's day partitions
    finally:
        engine.dispose()


def _assert_refused(url: str, *fragments: str) -> SchemaNotCurrent:
    with pytest.raises(SchemaNotCurrent) as info:
        open_store(url)
    message = str(info.value)
    assert "flywheel db upgrade" in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert current(db_url) is None
    refused = _assert_refused(db_url, "has no Flywheel schema", f"code expects {head()}")
    assert refused.current is None and refused.expected == head()

    upgrade(db_url)
    assert current(db_url) == head()
    assert _tables(db_url) == TABLES
    engine = open_store(db_url)
    try:
        assert check_schema(engine) == head()
        with session_factory(engine)() as session:
            session.add(
                Example(
                    dedup_key="k",
                    origin="seed",
                    features=[1.0],
                    label="a",
                    split="train",
                    created_at=datetime.now(UTC),
                )
            )
            session.commit()
            assert session.scalars(select(Example.label)).all() == ["a"]
    finally:
        engine.dispose()

    downgrade(db_url, "base")
    assert current(db_url) is None
    assert _tables(db_url) == set()
    _assert_refused(db_url, "has no Flywheel schema")

    upgrade(db_url)
    assert current(db_url) == head()
    assert _tables(db_url) == TABLES
    open_store(db_url).dispose()


def test_migrated_store_round_trips_and_dedups(db_url: str) -> None:
    upgrade(db_url)
    engine = open_store(db_url)
    t0 = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    rows = [
        {
            "dedup_key": f"k{i}",
            "origin": "seed",
            "features": [i, 0.5],
            "label": "a",
            "split": "train",
            "created_at": t0,
        }
        for i in range(3)
    ]
    try:
        with session_factory(engine)() as session:
            assert insert_ignoring_duplicates(session, Example, rows) == 3
            assert insert_ignoring_duplicates(session, Example, rows[1:]) == 0
            session.commit()
            got = session.scalars(select(Example).order_by(Example.id)).all()
            assert [e.dedup_key for e in got] == ["k0", "k1", "k2"]
            assert got[2].features == [2, 0.5] and got[2].weight == 1.0
            assert got[0].created_at == t0 and got[0].created_at.tzinfo is not None

            session.add(Example(**rows[0] | {"dedup_key": "bad", "split": "test"}))
            with pytest.raises(IntegrityError):
                session.commit()
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_name": lambda name, kind, _: (
                        not (kind == "table" and is_partition(name))
                    ),
                },
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_older_schema_is_refused(db_url: str) -> None:
    upgrade(db_url, "0001")  # a database the previous release migrated
    refused = _assert_refused(db_url, "is at revision 0001", f"code expects {head()}")
    assert type(refused) is SchemaNotCurrent
    assert head() != "0001"


def test_newer_schema_is_refused(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
        with pytest.raises(SchemaTooNew, match="9999_future.*newer Flywheel") as info:
            check_schema(engine)
        assert isinstance(info.value, SchemaNotCurrent)
    finally:
        engine.dispose()


def test_refusal_hides_the_password(pg_url: str) -> None:
    # Trust auth ignores the password, so it can be anything; it must never be printed.
    with_password = pg_url.replace("postgres@", "postgres:s3cret@", 1)
    assert "s3cret" in with_password
    refused = _assert_refused(with_password)
    assert "s3cret" not in str(refused) and "***" in str(refused)


# --- the CLI, as a real process -----------------------------------------------------------


def _flywheel() -> str:
    beside = Path(sys.executable).parent / "flywheel"
    found = str(beside) if beside.exists() else shutil.which("flywheel")
    assert found, "the `flywheel` console script is not installed"
    return found


def _cli(url: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(home), "FLYWHEEL_DATABASE_URL": url}
    result = subprocess.run(
        [_flywheel(), "db", *args],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=deadline(120),
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_upgrade_check_current_downgrade(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()

    refused = _cli(db_url, home, "check")
    assert refused.returncode == 1
    assert "flywheel db upgrade" in _error_line(refused)

    upgraded = _cli(db_url, home, "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"-> {head()}" in upgraded.stdout

    ok = _cli(db_url, home, "check")
    assert ok.returncode == 0, ok.stderr
    shown = _cli(db_url, home, "current")
    assert shown.returncode == 0 and f"{head()} (head)" in shown.stdout

    down = _cli(db_url, home, "downgrade", "-1")
    assert down.returncode == 0, down.stderr
    assert current(db_url) == sorted(known_revisions())[-2]  # one below head
    behind = _cli(db_url, home, "check")
    assert behind.returncode == 1 and "flywheel db upgrade" in _error_line(behind)
    down = _cli(db_url, home, "downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert current(db_url) is None
    empty = _cli(db_url, home, "current")
    assert empty.returncode == 0 and "no Flywheel schema" in empty.stdout


def test_cli_unreachable_database_is_one_line(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    result = _cli("postgresql://postgres:s3cret@127.0.0.1:1/nothing", tmp_path, "check")
    assert result.returncode == 1
    line = _error_line(result)
    assert "127.0.0.1" in line and "s3cret" not in line


def test_erasure_receipts_migration_keeps_the_store(db_url: str) -> None:
    """0014 adds `erasure_receipts` to a store filled at 0013 and leaves its rows; its
    downgrade drops only the new table."""
    upgrade(db_url, "0013")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO corrections (id, prediction_id, label, subject, created_at,"
                    " status) VALUES ('c1', 'p1', 'a', :h, :t, 'pending')"
                ),
                {"h": "ab" * 32, "t": datetime.now(UTC)},
            )
        upgrade(db_url, "0014")
        assert "erasure_receipts" in _tables(db_url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, subject FROM corrections")).all() == [
                ("c1", "ab" * 32)
            ]
            assert conn.execute(text("SELECT count(*) FROM erasure_receipts")).scalar() == 0
        downgrade(db_url, "0013")
        assert "erasure_receipts" not in _tables(db_url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id FROM corrections")).all() == [("c1",)]
    finally:
        engine.dispose()
