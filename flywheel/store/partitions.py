"""Daily range partitions of the large tables on PostgreSQL (declarative partitioning).

`predictions` is the store's largest table by far: every served prediction, one row, while
only the corrected few are ever read again. On PostgreSQL it is partitioned by RANGE of
`created_at` (the prediction's own timestamp, part of its event) into one partition a UTC
day, `predictions_pYYYYMMDD`, contiguous, between two catch-alls: `predictions_past` (from
MINVALUE to the first day: a late event of a dropped day) and `predictions_future` (from
the day after the last one to MAXVALUE: a clock far ahead, days not made yet). Retention
then drops whole days (`DROP TABLE` of a partition: no row deleted, no vacuum, no index
bloat) instead of deleting hundreds of millions of rows; SQLite keeps one plain table and
deletes rows.

Why catch-alls and not a DEFAULT partition: with a default partition PostgreSQL cannot
scan the partitions in time order, and the join's lookup of a correction's prediction
("the newest row with this id", `flywheel.feedback.join.lookup_predictions`) became a
Merge Append that probes every partition's index for every id; with range catch-alls it
is an ordered Append that stops at the first partition holding the id, newest first, where
nearly every corrected prediction is. 900 ids in a month of 1 M predictions: 0.18 s
against 0.62-0.87 s with the default partition (EXPLAIN ANALYZE on this machine).

Keys. A partitioned table's unique keys must hold its partition key, so the primary key is
`(id, created_at)` (migration 0012). Prediction ids stay unique in practice, and the join by
id stays exactly-once, because:
- an id is minted once by the service (`flywheel.events.new_id`, uuid4) together with the
  timestamp, and both travel in the same event: a redelivery (a replay after a crash, a
  producer's retry) carries the same `created_at`, lands in the same partition, hits the
  key and is skipped by ON CONFLICT DO NOTHING as before (tests/integration/test_lifecycle.py);
- what makes a join happen once is the correction's status change (`pending` -> `joined`,
  `flywheel.feedback.join`): `corrections` is not partitioned and keeps its primary key on
  `id`, so a correction is claimed by one transaction however many prediction rows match.
  The only record that could add a second row under an id is a forged one with another
  timestamp (a uuid4 collision is ~2^-61 after 2^61 predictions): it is stored, not
  dead-lettered as before, and cannot make a correction join twice.
A lookup by id probes the partitions' primary-key indexes newest first and stops at the
first hit (~13 partitions at the default retention); `bench storage` measures the join.

Partitions are created ahead (`FLYWHEEL_RETENTION_PARTITIONS_AHEAD` days) by
`flywheel db maintain` and the feedback workers' periodic maintenance
(`flywheel.store.retention`): the future catch-all is detached, the new days created with
the rows of their day moved out of it, and it is attached again after them, so a missed
day is repaired, never refused; dropping days extends the past catch-all over them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Connection, inspect, text
from sqlalchemy.orm import Session

PARTITIONED: dict[str, str] = {"predictions": "created_at"}
"""Table -> the column it is partitioned by (PostgreSQL)."""
_PARTITION = re.compile(r"^(?P<table>[a-z_]+)_(?:p(?P<day>\d{8})|past|future)$")
_BOUND = re.compile(r"'([^']+)'")


@dataclass(frozen=True)
class DayPartition:
    """One day partition of a table: its name and the UTC day it holds."""

    table: str
    name: str
    day: date

    @property
    def start(self) -> datetime:
        return datetime.combine(self.day, time(), tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=1)


def partition_name(table: str, day: date) -> str:
    """`predictions_p20261207`: the name of `table`'s partition for `day`."""
    return f"{table}_p{day:%Y%m%d}"


def past_partition(table: str) -> str:
    """`table`'s catch-all for times before its first day partition."""
    return f"{table}_past"


def future_partition(table: str) -> str:
    """`table`'s catch-all for times from the day after its last day partition."""
    return f"{table}_future"


def is_partition(name: str) -> bool:
    """Whether a table name is a partition of one of `PARTITIONED` (schema comparisons
    and table listings leave them out: they are data, not schema)."""
    found = _PARTITION.match(name)
    return found is not None and found.group("table") in PARTITIONED


def _bind(session: Session | Connection) -> Connection:
    return session.connection() if isinstance(session, Session) else session


def is_partitioned(session: Session | Connection, table: str) -> bool:
    """Whether `table` is a partitioned table here (PostgreSQL after migration 0012)."""
    conn = _bind(session)
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(
        text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
    ).scalar()
    return kind == "p"


def day_partitions(session: Session | Connection, table: str) -> list[DayPartition]:
    """`table`'s day partitions, oldest first (not the two catch-alls)."""
    conn = _bind(session)
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    ).scalars()
    out = []
    for name in names:
        found = _PARTITION.match(name)
        if found and found.group("day") and found.group("table") == table:
            day = datetime.strptime(found.group("day"), "%Y%m%d").date()
            out.append(DayPartition(table, name, day))
    return sorted(out, key=lambda p: p.day)


def _literal(moment: datetime) -> str:
    return f"'{moment.astimezone(UTC).isoformat()}'"


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


def _bound(conn: Connection, partition: str) -> datetime:
    """The finite bound of a catch-all partition (its upper for `past`, lower for
    `future`), read from the catalog."""
    expr = conn.execute(
        text("SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE oid = to_regclass(:n)"),
        {"n": partition},
    ).scalar_one()
    found = _BOUND.search(expr)
    if found is None:
        raise RuntimeError(f"{partition}: unexpected partition bound {expr!r}")
    return datetime.fromisoformat(found.group(1)).astimezone(UTC)


def _detach(conn: Connection, table: str, partition: str) -> None:
    conn.execute(text(f"ALTER TABLE {table} DETACH PARTITION {partition}"))


def _attach(conn: Connection, table: str, partition: str, lo: str, hi: str) -> None:
    conn.execute(
        text(f"ALTER TABLE {table} ATTACH PARTITION {partition} FOR VALUES FROM ({lo}) TO ({hi})")
    )


def create_layout(conn: Connection, table: str, first: date, last: date) -> None:
    """The partitions of a new partitioned `table` (migration 0012): the past catch-all,
    a partition a day from `first` to `last`, the future catch-all."""
    for name, bounds in (
        (past_partition(table), f"(MINVALUE) TO ({_literal(_midnight(first))})"),
        (future_partition(table), f"({_literal(_midnight(first))}) TO (MAXVALUE)"),
    ):
        conn.execute(text(f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM {bounds}"))
    ensure_partitions(conn, table, last)


def ensure_partitions(session: Session | Connection, table: str, last: date) -> list[str]:
    """Create `table`'s day partitions up to `last` (included): every day from the future
    catch-all's lower bound, so the days stay contiguous. The catch-all is detached, the
    rows of each new day moved out of it into the day's table, and it is attached again
    from the day after `last` (its check then reads what it still holds: rows stamped
    later than that, normally none). Returns the names created."""
    conn = _bind(session)
    future = future_partition(table)
    day = _bound(conn, future).date()
    if day > last:
        return []
    column = PARTITIONED[table]
    _detach(conn, table, future)
    created = []
    while day <= last:
        name = partition_name(table, day)
        lo, hi = _literal(_midnight(day)), _literal(_midnight(day + timedelta(days=1)))
        conn.execute(
            text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        )
        conn.execute(
            text(
                f"WITH moved AS (DELETE FROM {future} WHERE {column} >= {lo} AND {column} < {hi}"
                f" RETURNING *) INSERT INTO {name} SELECT * FROM moved"
            )
        )
        _attach(conn, table, name, lo, hi)
        created.append(name)
        day += timedelta(days=1)
    _attach(conn, table, future, _literal(_midnight(day)), "MAXVALUE")
    return created


def drop_partitions_before(
    session: Session | Connection, table: str, cutoff: datetime
) -> tuple[list[str], int]:
    """Drop `table`'s day partitions whose whole day is before `cutoff` and delete the
    past catch-all's rows older than it; the catch-all then reaches up to the first day
    left, so a late row of a dropped day still has a home. Returns (partitions dropped,
    rows removed -- the planner's estimate for a dropped partition: counting would read
    the whole day)."""
    conn = _bind(session)
    column = PARTITIONED[table]
    past = past_partition(table)
    days = day_partitions(conn, table)
    gone = [p for p in days if p.end <= cutoff]
    rows = 0
    if gone:
        _detach(conn, table, past)
    for part in gone:
        rows += max(
            int(
                conn.execute(
                    text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:n)"),
                    {"n": part.name},
                ).scalar_one()
            ),
            0,
        )
        _detach(conn, table, part.name)
        conn.execute(text(f"DROP TABLE {part.name}"))
    result = conn.execute(text(f"DELETE FROM {past} WHERE {column} < {_literal(cutoff)}"))
    rows += result.rowcount or 0
    if gone:
        left = days[len(gone) :]
        upper = left[0].start if left else _bound(conn, future_partition(table))
        _attach(conn, table, past, "MINVALUE", _literal(upper))
    return [p.name for p in gone], rows


@dataclass(frozen=True)
class TableSize:
    """One table's rows (the planner's estimate on PostgreSQL, a count on SQLite) and bytes
    on disk with its indexes and TOAST, partitions included (None where unknown: SQLite)."""

    table: str
    rows: int
    bytes: int | None
    partitions: int


def table_sizes(session: Session | Connection, tables: list[str]) -> list[TableSize]:
    """Sizes of `tables` for `flywheel db current --sizes` and `bench storage`."""
    conn = _bind(session)
    out = []
    existing = set(inspect(conn).get_table_names())
    for table in (t for t in tables if t in existing):
        if conn.dialect.name != "postgresql":
            rows = int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
            out.append(TableSize(table, rows, None, 0))
            continue
        members = conn.execute(
            text(
                "SELECT c.oid, c.reltuples FROM pg_class c WHERE c.oid = to_regclass(:t)"
                " UNION ALL SELECT c.oid, c.reltuples FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
            ),
            {"t": table},
        ).all()
        size = sum(
            int(conn.execute(text("SELECT pg_total_relation_size(:o)"), {"o": oid}).scalar_one())
            for oid, _ in members
        )
        rows = int(sum(max(float(n), 0.0) for _, n in members))
        out.append(TableSize(table, rows, size, max(len(members) - 1, 0)))
    return out


__all__ = [
    "PARTITIONED",
    "DayPartition",
    "TableSize",
    "create_layout",
    "day_partitions",
    "future_partition",
    "past_partition",
    "drop_partitions_before",
    "ensure_partitions",
    "is_partition",
    "is_partitioned",
    "partition_name",
    "table_sizes",
]
