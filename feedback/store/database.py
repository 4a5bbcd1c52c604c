"""Engines and sessions for the training store, and the refusal to run on a stale schema.

Every process opens the store through `open_store`, which checks the Alembic revision
first: code running against a schema it was not written for corrupts data quietly,
so a mismatch is a clear error that says which command fixes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    Table,
    TypeDecorator,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker

from flywheel.feedback.store.models import Base

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


def _json_loads(data: bytes | str) -> Any:
    """orjson where it can (~5x faster on the JSONB columns), else `json.loads` (integers
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
    from flywheel.feedback.store.migrate import head, known_revisions

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
            url=display_url(engine.url), current=current, expected=expected,
        )
    else:
        state = f"is at revision {current}"
    raise SchemaNotCurrent(
        f"{where} {state}, code expects {expected}: run `flywheel db upgrade`",
        url=display_url(engine.url), current=current, expected=expected,
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


def insert_ignoring_duplicates(
    session: Session, model: type[Base], rows: Iterable[Mapping[str, Any]]
) -> int:
    """Insert `rows`, skipping any that hit a unique key; return how many were new.

    This is how consumers make redelivered events harmless: rows are keyed by event id
    (corrections) or `dedup_key` (examples), so writing one twice is a no-op.
    """
    rows = list(rows)
    if not rows:
        return 0
    table = model.__table__
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        fast = _columnar_insert(table, rows)
        if fast is not None:
            sql, params = fast
            return session.execute(text(sql), params).rowcount
        stmt: Any = postgresql.insert(table)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table)
    else:
        raise NotImplementedError(f"training store does not support {dialect}")
    pk = next(iter(table.primary_key.columns))
    stmt = stmt.on_conflict_do_nothing().returning(pk)
    return len(session.execute(stmt, rows).all())


_PG = postgresql.dialect()


def _columnar_insert(table: Table, rows: list[Mapping[str, Any]]
                     ) -> tuple[str, dict[str, str]] | None:
    """`INSERT ... SELECT` from ONE jsonb parameter holding an array per column.

    SQLAlchemy's many-VALUES statements cost ~50-100 us a row on the client (bind
    processing per value, and psycopg parsing each long statement); here the client
    work is one orjson document and PostgreSQL unpacks it in C (`ROWS FROM` zips the
    columns back into rows, in order). Values get the same treatment as through the ORM
    types: aware UTC datetimes, JSON documents, Python-side column defaults, and the
    column types' own checks on assignment. Returns None for anything unusual -- rows
    with differing or unknown keys, values of unexpected types, non-finite floats, SQL
    defaults -- so the caller takes the general path and keeps its exact behaviour.
    """
    keys = set(rows[0])
    if not keys <= set(table.c.keys()) or any(r.keys() != keys for r in rows):
        return None
    names: list[str] = []
    selects: list[str] = []
    sources: list[str] = []
    doc: dict[str, list[Any]] = {}
    for col in table.c:
        if col.key in keys:
            values = [r[col.key] for r in rows]
        elif col.default is not None:
            default = col.default
            if getattr(default, "is_scalar", False):
                values = [default.arg] * len(rows)  # type: ignore[attr-defined]
            elif getattr(default, "is_callable", False):
                try:  # SQLAlchemy wraps a no-argument callable to take a context
                    values = [default.arg(None) for _ in rows]  # type: ignore[attr-defined]
                except Exception:  # one that needs a real execution context
                    return None
            else:
                return None
        else:
            continue  # server default (or NULL), exactly as the general path leaves it
        prepared = _column_values(col, values)
        if prepared is None:
            return None
        values, elements, cast = prepared
        name = f"c{len(names)}"
        names.append(_PG.identifier_preparer.quote(col.name))
        doc[name] = values
        sources.append(f"{elements}(d.doc -> '{name}')")
        selects.append(f"CAST(t.{name} AS {cast})" if cast else f"t.{name}")
    if not names:
        return None
    try:
        text_doc = orjson.dumps(doc).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. an int beyond 64 bits
        return None
    sql = (f"INSERT INTO {_PG.identifier_preparer.format_table(table)} ({', '.join(names)}) "
           f"SELECT {', '.join(selects)} FROM (SELECT CAST(:doc AS JSONB) AS doc) AS d, "
           f"ROWS FROM ({', '.join(sources)}) AS t({', '.join(doc)}) ON CONFLICT DO NOTHING")
    return sql, {"doc": text_doc}


def _column_values(col: Any, values: list[Any]) -> tuple[list[Any], str, str | None] | None:
    """(values for the JSON document, the function that unpacks them, the SQL type to cast
    the unpacked text to), or None to take the general path."""
    col_type = col.type
    if isinstance(col_type, TypeDecorator):
        process = col_type.process_bind_param
        try:
            values = [process(v, _PG) for v in values]
        except Exception:  # refused (a naive datetime): the general path words it, as before
            return None
        col_type = col_type.impl_instance
    sql_type = col_type.compile(dialect=_PG)
    if isinstance(col_type, JSON):
        out = []
        for v in values:
            if v is None and col_type.none_as_null:
                return None
            try:
                dumped = orjson.dumps(v)
            except TypeError:  # what orjson cannot write (non-str keys, numpy scalars)
                return None
            if b"null" in dumped and v is not None:  # None inside, or NaN/inf: general path
                return None
            out.append(orjson.Fragment(dumped))
        return out, "jsonb_array_elements", None if sql_type == "JSONB" else sql_type
    if isinstance(col_type, String):
        # no CAST: assigning text to VARCHAR(n) refuses what is too long, as before
        ok = all(v is None or type(v) is str for v in values)
        return (values, "jsonb_array_elements_text", None) if ok else None
    if isinstance(col_type, Float):
        if not all(v is None or (type(v) in (float, int) and math.isfinite(v))
                   for v in values):
            return None
        return ([None if v is None else float(v) for v in values], "jsonb_array_elements_text",
                sql_type)
    if isinstance(col_type, Integer):  # BigInteger too
        ok = all(v is None or type(v) is int for v in values)
        return (values, "jsonb_array_elements_text", sql_type) if ok else None
    if isinstance(col_type, DateTime):
        ok = all(v is None or type(v) is datetime for v in values)
        return (values, "jsonb_array_elements_text", sql_type) if ok else None
    return None


__all__ = [
    "SchemaNotCurrent", "SchemaTooNew", "check_schema", "display_url", "insert_ignoring_duplicates",
    "make_engine", "normalize_url", "open_store", "schema_revision", "session_factory",
]
