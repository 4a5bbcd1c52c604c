"""Engines and sessions for the training store, and the refusal to run on a stale schema.

Every process opens the store through `open_store`, which checks the Alembic revision
first: code running against a schema it was not written for corrupts data quietly,
so a mismatch is a clear error that says which command fixes it.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from sqlalchemy import (
    Engine,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_ALIASES = {"postgres", "postgresql"}


class SchemaNotCurrent(RuntimeError):
    """The database's schema revision is not the one this code was written for."""

    def __init__(self, message: str, *, url: str, current: str | None, expected: str) -> None:
        super().__init__(message)
        self.url = url
        self.current = current
        self.expected = expected


class SchemaTooNew(SchemaNotCurrent):
    """The database was migrated by newer code; upgrading this code, not the DB, fixes it."""


def normalize_url(url: str | URL) -> URL:
    """Parse `url`; plain `postgresql://` (or `postgres://`) means psycopg 3, not psycopg2."""
    parsed = make_url(url)
    if parsed.drivername in _PG_ALIASES:
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def display_url(url: str | URL) -> str:
    """The URL as safe to print: the password masked."""
    return normalize_url(url).render_as_string(hide_password=True)


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine with Flywheel's connection settings; `kwargs` go to `create_engine`.

    SQLite gets WAL (readers do not block the writer), enforced foreign keys and a busy
    timeout so concurrent processes wait instead of failing with "database is locked".
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # long-lived services outlive server restarts
    if parsed.drivername == "postgresql+psycopg":
        kwargs.setdefault("json_deserializer", _json_loads)
    return create_engine(parsed, **kwargs)


def driver_connection(session: Session) -> Any:
    """The DBAPI (psycopg) connection under `session`'s, for COPY and unprepared statements.

    Raises RuntimeError if SQLAlchemy no longer holds one (the connection was invalidated
    or closed), rather than failing later on an attribute of None."""
    driver = session.connection().connection.driver_connection
    if driver is None:
        raise RuntimeError("the store session's database connection is closed or invalidated")
    return driver


def _json_loads(data: bytes | str) -> Any:
    """orjson where it can (~5x faster on the JSON columns), else `json.loads` (integers
    beyond 64 bits), so every document reads back exactly as before."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (they are handed to threads)."""
    return sessionmaker(engine, expire_on_commit=False)


def check_schema(engine: Engine) -> str:
    """Return the database's revision if it is the code's head, else raise SchemaNotCurrent."""
    from flywheel.store.migrate import head, known_revisions

    expected = head()
    current = schema_revision(engine)
    if current == expected:
        return current
    where = f"database at {display_url(engine.url)}"
    if current is None:
        state = "has no Flywheel schema"
    elif current not in known_revisions():
        raise SchemaTooNew(
            f"{where} is at revision {current}, which this code does not know (newest it knows:"
            f" {expected}); it was migrated by a newer Flywheel: run that version instead",
            url=display_url(engine.url),
            current=current,
            expected=expected,
        )
    else:
        state = f"is at revision {current}"
    raise SchemaNotCurrent(
        f"{where} {state}, code expects {expected}: run `flywheel db upgrade`",
        url=display_url(engine.url),
        current=current,
        expected=expected,
    )


def schema_revision(engine: Engine) -> str | None:
    """The revision stamped in the database, or None when it has never been migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        heads = MigrationContext.configure(conn).get_current_heads()
    if len(heads) > 1:  # never produced by Flywheel's linear history
        return ",".join(sorted(heads))
    return heads[0] if heads else None


def open_store(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for the store at `url`, after checking its schema is the code's head."""
    engine = make_engine(url, **kwargs)
    try:
        check_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine


__all__ = [
    "SchemaNotCurrent",
    "SchemaTooNew",
    "check_schema",
    "display_url",
    "make_engine",
    "normalize_url",
    "open_store",
    "schema_revision",
    "session_factory",
]
