"""Bulk writes that are safe to repeat: how consumers make redelivered records harmless.

Rows are keyed by event id (predictions, corrections) or `dedup_key` (examples), and a row
that is already there is skipped, so writing a batch twice stores it once.

On PostgreSQL a batch of rows that are all new -- every batch but a replay -- goes in with
COPY, the cheapest way in for the server (about 40 % less CPU a row than an INSERT of the
same rows); COPY cannot skip duplicates, so it runs inside a savepoint and, if any row is
already stored, the savepoint is rolled back and the batch is written by the
duplicate-skipping INSERT instead. That INSERT sends ONE jsonb parameter holding an array
per column (PostgreSQL unpacks it in C), not SQLAlchemy's many-VALUES statement (~50-100 us
a row of client work). Small batches skip COPY (three round trips instead of one), and
values the fast paths are not sure to store exactly as the ORM would take SQLAlchemy's
general path, which also words every error.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from types import NoneType
from typing import Any

import orjson
from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Table, TypeDecorator, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flywheel.store.database import driver_connection
from flywheel.store.models import Base, UTCDateTime

COPY_MIN_ROWS = 64  # below this, one INSERT beats SAVEPOINT + COPY + RELEASE
INSERT_PATHS = frozenset({"copy", "columnar", "general"})
"""The PostgreSQL insert paths in use, fastest first; "general" (one INSERT per batch of
rows, ON CONFLICT DO NOTHING) always stays. A test narrows it to check one path alone."""
ROWS_BY_PATH: Counter[str] = Counter()
"""Rows each path stored in this process (copy, columnar, general): which path a batch
took, seen from outside without reaching into the functions."""
_PG = postgresql.dialect()


def insert_ignoring_duplicates(
    session: Session,
    model: type[Base],
    rows: Iterable[Mapping[str, Any]],
    encoded: EncodedRows | None = None,
) -> int:
    """Insert `rows`, skipping any that hit a unique key; return how many were new.

    `encoded`: COPY lines made ahead of time (by another thread) for some or all of the
    rows, found by row object; only the others are encoded here."""
    rows = list(rows)
    if not rows:
        return 0
    table = _table(model)
    if _dialect(session) == "postgresql":
        copied = _copy(session, table, rows, encoded)
        if copied is not None:
            ROWS_BY_PATH["copy"] += copied
            return copied
        fast = _columnar_insert(table, rows)
        if fast is not None:
            sql, params = fast
            result = session.execute(text(sql), params)
            assert isinstance(result, CursorResult)  # a DML statement's (typed as Result)
            ROWS_BY_PATH["columnar"] += result.rowcount
            return result.rowcount
    stored = len(_general_insert(session, table, rows))
    ROWS_BY_PATH["general"] += stored
    return stored


def insert_returning_new(
    session: Session, model: type[Base], rows: Iterable[Mapping[str, Any]]
) -> list[Any]:
    """Insert `rows`, skipping any that hit a unique key; return the primary keys of the
    new ones (given in the rows, or COPY cannot report them; a key of several columns as
    a tuple of them, in the key's order). Who inserted a row is who owns it: two workers,
    or a worker and its own replay, cannot both see the same key come back."""
    rows = list(rows)
    if not rows:
        return []
    table = _table(model)
    pk = _primary_key(table)
    if _dialect(session) == "postgresql":
        if all(c.key in rows[0] for c in pk) and _copy(session, table, rows) is not None:
            ROWS_BY_PATH["copy"] += len(rows)
            if len(pk) == 1:
                return [r[pk[0].key] for r in rows]
            return [tuple(r[c.key] for c in pk) for r in rows]
        fast = _columnar_insert(table, rows, returning=[c.name for c in pk])
        if fast is not None:
            sql, params = fast
            result = session.execute(text(sql), params)
            new = [r[0] for r in result] if len(pk) == 1 else [tuple(r) for r in result]
            ROWS_BY_PATH["columnar"] += len(new)
            return new
    new = _general_insert(session, table, rows)
    ROWS_BY_PATH["general"] += len(new)
    return new


def _table(model: type[Base]) -> Table:
    """The model's table (SQLAlchemy types `__table__` as any FromClause)."""
    table = model.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model.__name__} is not mapped to a plain Table")
    return table


def _dialect(session: Session) -> str:
    dialect = session.get_bind().dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise NotImplementedError(f"training store does not support {dialect}")
    return dialect


def _primary_key(table: Table) -> list[Any]:
    return list(table.primary_key.columns)


def _general_insert(session: Session, table: Table, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """SQLAlchemy's INSERT ... ON CONFLICT DO NOTHING RETURNING pk: every type, every
    error worded; what the fast paths fall back to. A key of several columns comes back
    as tuples."""
    insert = postgresql.insert if _dialect(session) == "postgresql" else sqlite.insert
    pk = _primary_key(table)
    stmt = insert(table).on_conflict_do_nothing().returning(*pk)
    if len(pk) == 1:
        return list(session.scalars(stmt, rows))
    return [tuple(r) for r in session.execute(stmt, rows)]


# -- column values the fast paths can send --------------------------------------------------
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL = "\\N"  # COPY's text format


@dataclass(frozen=True)
class _Column:
    name: str  # quoted for SQL
    values: list[Any]  # after the column type's bind processing; JSON as text
    kind: str  # json | text | number | datetime
    cast: str | None  # SQL type to cast unpacked jsonb text to (the columnar INSERT)

    def copy_text(self) -> list[str]:
        """The values in COPY's text format (NULL as \\N; backslash, tab and newlines
        escaped), converted a column at a time."""
        values = self.values
        if self.kind == "json":
            texts = values  # JSON has no raw tab or newline
        elif self.kind == "text":
            texts = [_NULL if v is None else v for v in values]
            joined = "\x00".join(filter(None, values))  # "" has nothing to escape
            if any(c in joined for c in "\\\t\n\r"):
                texts = [t if t is _NULL else t.translate(_COPY_ESCAPES) for t in texts]
            return texts
        elif self.kind == "number":
            texts = [_NULL if v is None else repr(v) for v in values]
        else:  # aware datetimes: RFC 3339 with the offset, which timestamptz reads exactly
            texts = [_NULL if v is None else v for v in _iso_texts(values)]
        if self.kind == "json" and any("\\" in t for t in texts):
            texts = [t.replace("\\", "\\\\") for t in texts]
        return texts


def _iso_texts(values: list[datetime | None]) -> list[str | None]:
    """`isoformat()` of each, by orjson a column at a time (5x faster than one by one).
    A column of one datetime object (a batch's rows are stamped together) is converted once."""
    if len(values) > 1 and values[0] is not None and _all_the_same(values):
        return _iso_texts(values[:1]) * len(values)
    try:
        return orjson.loads(orjson.dumps(values))
    except (TypeError, orjson.JSONEncodeError):  # a tzinfo orjson does not know
        return [None if v is None else v.isoformat() for v in values]


def _prepared_columns(table: Table, rows: list[Mapping[str, Any]]) -> list[_Column] | None:
    """Each column's values for `rows`: given, or the column's Python-side default, with
    the ORM types' treatment (aware UTC datetimes, naive ones refused, JSON documents);
    None for anything unusual -- rows with differing or unknown keys, values of unexpected
    types, non-finite floats, SQL-side defaults -- so the caller takes the general path
    and keeps its exact behaviour."""
    keys = list(rows[0])
    if not set(keys) <= set(table.c.keys()) or set(map(len, rows)) != {len(keys)}:
        return None
    try:  # a row missing a key raises; with the lengths equal, no row has another key
        if len(keys) == 1:
            columns = {keys[0]: [r[keys[0]] for r in rows]}
        else:
            values = zip(*map(operator.itemgetter(*keys), rows), strict=True)
            columns = dict(zip(keys, map(list, values), strict=True))
    except KeyError:
        return None
    return _columns_of(table, columns, len(rows))


def _columns_of(table: Table, given: Mapping[str, list[Any]], n: int) -> list[_Column] | None:
    """`_prepared_columns` for values given a column at a time (`n` rows)."""
    out = []
    for col in table.c:
        if col.key in given:
            values = given[col.key]
        elif col.default is not None:
            default = col.default
            if getattr(default, "is_scalar", False):
                values = [default.arg] * n  # type: ignore[attr-defined]
            elif getattr(default, "is_callable", False):
                try:  # SQLAlchemy wraps a no-argument callable to take a context
                    values = [default.arg(None) for _ in range(n)]  # type: ignore[attr-defined]
                except Exception:  # one that needs a real execution context
                    return None
            else:
                return None
        else:
            continue  # server default (or NULL), exactly as the general path leaves it
        column = _column(col, values)
        if column is None:
            return None
        out.append(column)
    return out or None


def _types(values: list[Any]) -> set[type]:
    return set(map(type, values))


def _all_the_same(values: list[Any]) -> bool:
    """Every item is the first object itself (checked in C, stopping at the first other;
    by identity: comparing aware datetimes calls their tzinfo's utcoffset each time)."""
    return all(map(operator.is_, values, repeat(values[0])))


def _distinct_enough(values: list[Any]) -> list[Any]:
    """`values`, or just the first when every item is that same object: what a check of
    each value's own properties needs to see."""
    return values[:1] if values and _all_the_same(values) else values


def _column(col: Any, values: list[Any]) -> _Column | None:
    col_type = col.type
    name = _PG.identifier_preparer.quote(col.name)
    if isinstance(col_type, UTCDateTime):
        # what its bind processing checks; the offset itself is kept (PostgreSQL reads it)
        if not _types(values) <= {datetime, NoneType} or any(
            v is not None and v.tzinfo is None for v in _distinct_enough(values)
        ):
            return None  # naive: refused by the type, on the general path, as before
        return _Column(name, values, "datetime", "TIMESTAMP WITH TIME ZONE")
    if isinstance(col_type, TypeDecorator):
        process = col_type.process_bind_param
        try:
            values = [process(v, _PG) for v in values]
        except Exception:  # refused: the general path words it, as before
            return None
        col_type = col_type.impl_instance
    sql_type = col_type.compile(dialect=_PG)
    if isinstance(col_type, Boolean):  # COPY's and a CAST's text: t / f
        if not _types(values) <= {bool, NoneType}:
            return None
        texts = [None if v is None else "tf"[not v] for v in values]
        return _Column(name, texts, "text", "BOOLEAN")
    if isinstance(col_type, JSON):
        if col_type.none_as_null and None in values:
            return None
        try:  # str at once: 4x faster than keeping orjson's bytes (its allocations)
            dumped = [orjson.dumps(v).decode() for v in values]
        except TypeError:  # what orjson cannot write (non-str keys, numpy scalars)
            return None
        if any("null" in d for d in dumped) and any(  # None inside, or NaN/inf
            "null" in d and v is not None for d, v in zip(dumped, values, strict=True)
        ):
            return None
        return _Column(name, dumped, "json", None if sql_type == "JSONB" else sql_type)
    types = _types(values)
    if isinstance(col_type, String):
        # no CAST: assigning text to VARCHAR(n) refuses what is too long, as before
        return _Column(name, values, "text", None) if types <= {str, NoneType} else None
    if isinstance(col_type, Float):
        if (
            not types <= {float, int, NoneType}
            or bool in types
            or not all(math.isfinite(v) for v in values if v is not None)
        ):
            return None
        if int in types:
            values = [None if v is None else float(v) for v in values]
        return _Column(name, values, "number", sql_type)
    if isinstance(col_type, Integer):  # BigInteger too
        return _Column(name, values, "number", sql_type) if types <= {int, NoneType} else None
    if isinstance(col_type, DateTime):
        ok = types <= {datetime, NoneType}
        return _Column(name, values, "datetime", sql_type) if ok else None
    return None


# -- PostgreSQL: COPY, and the columnar INSERT -----------------------------------------------
@dataclass(frozen=True)
class CopyRows:
    """Rows encoded for COPY ahead of time (by another thread): one text line each."""

    table: Table
    columns: str  # the column list, quoted
    lines: list[str]


def encode_for_copy(model: type[Base], rows: list[Mapping[str, Any]]) -> CopyRows | None:
    """`rows` in COPY's text format, or None for rows only the general path takes."""
    return _encode(_table(model), rows) if rows else None


def encode_columns(model: type[Base], given: Mapping[str, list[Any]]) -> CopyRows | None:
    """`encode_for_copy` for values given a column at a time (no row dicts to build)."""
    n = len(next(iter(given.values()), []))
    if (
        not n
        or any(len(v) != n for v in given.values())
        or not set(given) <= set(_table(model).c.keys())
    ):
        return None
    return _lines(_table(model), _columns_of(_table(model), given, n))


def copy_all_new(session: Session, encoded: CopyRows) -> bool:
    """COPY encoded rows expected to be new: True if every one was stored; False if any
    was there already (or refused), the savepoint rolled back (PostgreSQL only)."""
    stored = _copy_lines(session, encoded) == len(encoded.lines)
    if stored:
        ROWS_BY_PATH["copy"] += len(encoded.lines)
    return stored


def _encode(table: Table, rows: list[Mapping[str, Any]]) -> CopyRows | None:
    return _lines(table, _prepared_columns(table, rows))


def _lines(table: Table, columns: list[_Column] | None) -> CopyRows | None:
    if columns is None:
        return None
    lines = list(map("\t".join, zip(*(c.copy_text() for c in columns), strict=True)))
    return CopyRows(table, ", ".join(c.name for c in columns), lines)


def insert_all_new(session: Session, model: type[Base], rows: Sequence[Mapping[str, Any]]) -> bool:
    """Insert rows expected to be new: True if every one was. False if any was already
    stored (or refused): then the others may or may not be written, and the caller must
    roll back the transaction. The fast path of a batch that is not a replay."""
    if not rows:
        return True
    if _dialect(session) == "postgresql":
        return insert_ignoring_duplicates(session, model, rows) == len(rows)
    return len(_general_insert(session, _table(model), rows)) == len(rows)


class EncodedRows:
    """COPY lines for a set of row objects, made ahead of time: `line(row)` is the row's
    line, or None for a row that was not among them."""

    def __init__(self, encoded: CopyRows, rows: list[Mapping[str, Any]]) -> None:
        self.table, self.columns = encoded.table, encoded.columns
        self._lines = dict(zip(map(id, rows), encoded.lines, strict=True))
        self._rows = rows  # keeps the objects (and so their ids) alive

    @classmethod
    def of(cls, model: type[Base], rows: list[Mapping[str, Any]]) -> EncodedRows | None:
        encoded = encode_for_copy(model, rows)
        return None if encoded is None else cls(encoded, rows)

    def line(self, row: Mapping[str, Any]) -> str | None:
        return self._lines.get(id(row))


def _copy(
    session: Session,
    table: Table,
    rows: list[Mapping[str, Any]],
    encoded: EncodedRows | None = None,
) -> int | None:
    """COPY `rows`: the number stored, or None when COPY is not for them (too few,
    unusual values) or refused them (a duplicate, a value the table refuses)."""
    if len(rows) < COPY_MIN_ROWS or "copy" not in INSERT_PATHS:
        return None
    if encoded is not None and encoded.table is table:
        lines = [encoded.line(r) for r in rows]
        rest = [r for r, line in zip(rows, lines, strict=True) if line is None]
        more = _encode(table, rest) if rest else None
        if not rest or (more is not None and more.columns == encoded.columns):
            extra = iter(more.lines if more else ())
            filled = [line if line is not None else next(extra) for line in lines]
            return _copy_lines(session, CopyRows(table, encoded.columns, filled))
    whole = _encode(table, rows)
    return None if whole is None else _copy_lines(session, whole)


def _copy_lines(session: Session, encoded: CopyRows) -> int | None:
    """COPY encoded rows in a savepoint: the number stored, or None if PostgreSQL refused
    them (the savepoint rolled back, so the caller can take the INSERT)."""
    import psycopg

    sql = (
        f"COPY {_PG.identifier_preparer.format_table(encoded.table)} ({encoded.columns}) FROM STDIN"
    )
    driver = driver_connection(session)
    try:
        driver.execute("SAVEPOINT flywheel_copy")
        try:
            with driver.cursor() as cursor:
                with cursor.copy(sql) as copy:
                    copy.write("\n".join(encoded.lines) + "\n")
                copied = cursor.rowcount
        except psycopg.Error:
            driver.execute("ROLLBACK TO SAVEPOINT flywheel_copy")
            raise
        driver.execute("RELEASE SAVEPOINT flywheel_copy")
        return copied
    except psycopg.OperationalError as exc:  # the store is down or busy: retry, not the rows
        raise OperationalError(sql, None, exc) from exc
    except psycopg.Error:  # a duplicate, or a value the general path will word
        return None


def _columnar_insert(
    table: Table, rows: list[Mapping[str, Any]], returning: list[str] | None = None
) -> tuple[str, dict[str, str]] | None:
    """`INSERT ... SELECT` from ONE jsonb parameter holding an array per column (`ROWS
    FROM` zips the columns back into rows, in order), skipping duplicates."""
    if "columnar" not in INSERT_PATHS:
        return None
    columns = _prepared_columns(table, rows)
    if columns is None:
        return None
    selects: list[str] = []
    sources: list[str] = []
    doc: dict[str, list[Any]] = {}
    for i, c in enumerate(columns):
        name = f"c{i}"
        if c.kind == "json":
            doc[name] = [orjson.Fragment(v) for v in c.values]
            sources.append(f"jsonb_array_elements(d.doc -> '{name}')")
        else:
            doc[name] = c.values
            sources.append(f"jsonb_array_elements_text(d.doc -> '{name}')")
        selects.append(f"CAST(t.{name} AS {c.cast})" if c.cast else f"t.{name}")
    try:
        text_doc = orjson.dumps(doc).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. an int beyond 64 bits
        return None
    sql = (
        f"INSERT INTO {_PG.identifier_preparer.format_table(table)} "
        f"({', '.join(c.name for c in columns)}) "
        f"SELECT {', '.join(selects)} FROM (SELECT CAST(:doc AS JSONB) AS doc) AS d, "
        f"ROWS FROM ({', '.join(sources)}) AS t({', '.join(doc)}) ON CONFLICT DO NOTHING"
    )
    if returning:
        sql += " RETURNING " + ", ".join(_PG.identifier_preparer.quote(r) for r in returning)
    return sql, {"doc": text_doc}


__all__ = [
    "COPY_MIN_ROWS",
    "CopyRows",
    "EncodedRows",
    "encode_for_copy",
    "insert_all_new",
    "insert_ignoring_duplicates",
    "insert_returning_new",
]
