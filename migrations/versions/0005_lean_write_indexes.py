"""Feedback: fewer index entries per written row; partial indexes for the rare rows.

Every prediction, correction and example the feedback worker writes also went into every
index of its table, and three of those indexes served no query: predictions by
(model_name, model_version), examples by parent_prediction_id, and examples by split (a
three-valued column: the learner's reads by split walk the primary key in id order). The
queries that do need one find rare rows, so they get partial indexes that only those rows
enter: quarantined examples (the corroboration sweep), and pending corrections by
prediction id (a new prediction's claim, the sweep's late joins and the expiry), which
replaces the full indexes of corrections by prediction id and by status. A correction
joined as it is written -- nearly all of them -- now enters no index but its key.
`bench feedback` on PostgreSQL: less server CPU per correction (docs/benchmarks.md).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

QUARANTINE = "ix_examples_quarantine"
QUARANTINE_PREDICATE = "split = 'quarantine'"
PENDING = "ix_corrections_pending_prediction_id"
PENDING_PREDICATE = "status = 'pending'"


def upgrade() -> None:
    op.drop_index("ix_predictions_model_name_model_version", table_name="predictions")
    op.drop_index("ix_examples_parent_prediction_id", table_name="examples")
    op.drop_index("ix_examples_split", table_name="examples")
    op.drop_index("ix_corrections_status", table_name="corrections")
    op.drop_index("ix_corrections_prediction_id", table_name="corrections")
    op.create_index(
        QUARANTINE,
        "examples",
        ["id"],
        postgresql_where=sa.text(QUARANTINE_PREDICATE),
        sqlite_where=sa.text(QUARANTINE_PREDICATE),
    )
    op.create_index(
        PENDING,
        "corrections",
        ["prediction_id"],
        postgresql_where=sa.text(PENDING_PREDICATE),
        sqlite_where=sa.text(PENDING_PREDICATE),
    )


def downgrade() -> None:
    op.drop_index(PENDING, table_name="corrections")
    op.drop_index(QUARANTINE, table_name="examples")
    op.create_index("ix_corrections_prediction_id", "corrections", ["prediction_id"])
    op.create_index("ix_corrections_status", "corrections", ["status"])
    op.create_index("ix_examples_split", "examples", ["split"])
    op.create_index("ix_examples_parent_prediction_id", "examples", ["parent_prediction_id"])
    op.create_index(
        "ix_predictions_model_name_model_version", "predictions", ["model_name", "model_version"]
    )
