"""Store lifecycle: `predictions` partitioned by day on PostgreSQL (retention drops days).

PostgreSQL: the table is renamed aside, a table of the same columns partitioned by RANGE
of `created_at` takes its name, with one partition a UTC day from
the oldest stored prediction's day to three days ahead; every row is copied over (in one
INSERT ... SELECT, inside the migration's transaction: a failure leaves the old table as
it was) and the old table is dropped. The primary key becomes `(id, created_at)`: a
partitioned table's unique keys must hold its partition key; why ids stay unique and the
join by id exactly-once is argued in `flywheel.store.partitions`. SQLite: nothing changes
(retention deletes rows there).

Downgrade copies the rows back into a plain table keyed by `id` alone (a second row under
an id, possible only with a forged event, keeps its oldest copy).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

from alembic import op
from sqlalchemy import text

from flywheel.store.partitions import create_layout

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

AHEAD_DAYS = 3  # as FLYWHEEL_RETENTION_PARTITIONS_AHEAD's default
OLD = "predictions_unpartitioned"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE predictions RENAME TO {OLD}")
    op.execute(f"ALTER TABLE {OLD} RENAME CONSTRAINT pk_predictions TO pk_{OLD}")
    op.execute(
        f"CREATE TABLE predictions (LIKE {OLD} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        " PARTITION BY RANGE (created_at)"
    )
    op.execute("ALTER TABLE predictions ADD CONSTRAINT pk_predictions PRIMARY KEY (id, created_at)")
    today = datetime.now(UTC).date()
    oldest = bind.execute(text(f"SELECT min(created_at) FROM {OLD}")).scalar()
    first: date = today if oldest is None else min(oldest.astimezone(UTC).date(), today)
    # one partition a day the old rows span: a day with no row gets an empty table, which
    # retention drops when its day is past
    create_layout(bind, "predictions", first, today + timedelta(days=AHEAD_DAYS))
    op.execute(f"INSERT INTO predictions SELECT * FROM {OLD}")
    op.execute(f"DROP TABLE {OLD}")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE predictions RENAME TO {OLD}")
    op.execute(f"CREATE TABLE predictions (LIKE {OLD} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    op.execute("ALTER TABLE predictions ADD CONSTRAINT pk_predictions_plain PRIMARY KEY (id)")
    op.execute(
        f"INSERT INTO predictions SELECT DISTINCT ON (id) * FROM {OLD} ORDER BY id, created_at"
    )
    op.execute(f"DROP TABLE {OLD} CASCADE")
    op.execute("ALTER TABLE predictions RENAME CONSTRAINT pk_predictions_plain TO pk_predictions")
