"""Feedback: the per-source counterexample budget reads counters, not the examples.

Up to 0005 the worker counted each source's counterexamples in the budget window, row by
row through the partial index of 0004, for every batch with a trainable error: a query
that read up to the budget's worth of index entries per source (5-6 ms a batch, ~10 % of
PostgreSQL's CPU in `bench feedback`), and an index entry for every counterexample
written. Now a trigger on `examples` adds what each statement stored to a counter per
(source, minute), and the budget check sums a window's minutes per source.

The trigger counts rows an INSERT or COPY actually stored (PostgreSQL: the statement's
transition table; SQLite: each inserted row), so a replay whose rows are already there
adds nothing, and a COPY rolled back to its savepoint takes its counts with it. Counters
are upserted in (source, minute) order, so two workers' transactions lock them in the
same order and cannot deadlock on them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "counterexample_usage"
TRIGGER = "examples_count_counterexamples"
FUNCTION = "flywheel_count_counterexamples"
OLD_INDEX = "ix_examples_counterexample_source_created_at"
OLD_PREDICATE = "origin = 'counterexample'"

# The minute a timestamp falls in, independent of the session's time zone.
PG_MINUTE = "date_bin('1 minute', {0}, TIMESTAMPTZ '2000-01-01 00:00:00+00')"
# SQLite keeps UTC times as 'YYYY-MM-DD HH:MM:SS[.ffffff]' text (models.UTCDateTime).
SQLITE_MINUTE = "substr({0}, 1, 16) || ':00.000000'"

PG_FUNCTION = f"""
CREATE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {TABLE} AS u (source, minute, count)
    SELECT coalesce(source, ''), {PG_MINUTE.format("created_at")}, count(*)
    FROM new_examples WHERE origin = 'counterexample'
    GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (source, minute) DO UPDATE SET count = u.count + excluded.count;
    RETURN NULL;
END
$$
"""
PG_TRIGGER = f"""
CREATE TRIGGER {TRIGGER} AFTER INSERT ON examples
REFERENCING NEW TABLE AS new_examples
FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()
"""
SQLITE_TRIGGER = f"""
CREATE TRIGGER {TRIGGER} AFTER INSERT ON examples
WHEN NEW.origin = 'counterexample'
BEGIN
    INSERT INTO {TABLE} (source, minute, count)
    VALUES (coalesce(NEW.source, ''), {SQLITE_MINUTE.format("NEW.created_at")}, 1)
    ON CONFLICT (source, minute) DO UPDATE SET count = count + 1;
END
"""


def _raw(sql: str) -> None:
    """As written: SQLAlchemy's text() would read ':00' as a bind parameter."""
    op.get_bind().exec_driver_sql(sql)


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("source", "minute", name=op.f(f"pk_{TABLE}")),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    minute = (PG_MINUTE if postgresql else SQLITE_MINUTE).format("created_at")
    _raw(  # what is stored already
        f"INSERT INTO {TABLE} (source, minute, count) "
        f"SELECT coalesce(source, ''), {minute}, count(*) FROM examples "
        f"WHERE origin = 'counterexample' GROUP BY 1, 2"
    )
    if postgresql:
        _raw(PG_FUNCTION)
        _raw(PG_TRIGGER)
    else:
        _raw(SQLITE_TRIGGER)
    op.drop_index(OLD_INDEX, table_name="examples")


def downgrade() -> None:
    op.create_index(
        OLD_INDEX,
        "examples",
        ["source", "created_at"],
        postgresql_where=sa.text(OLD_PREDICATE),
        sqlite_where=sa.text(OLD_PREDICATE),
    )
    if op.get_bind().dialect.name == "postgresql":
        _raw(f"DROP TRIGGER {TRIGGER} ON examples")
        _raw(f"DROP FUNCTION {FUNCTION}()")
    else:
        _raw(f"DROP TRIGGER {TRIGGER}")
    op.drop_table(TABLE)
