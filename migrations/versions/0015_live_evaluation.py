"""Live evaluation (issue 28): `scores` (a version's score of a prediction it did not
answer) and `outcomes` (each version's result on each labelled prediction).

New tables only, so existing data is untouched. `scores` is indexed by time for
retention; `outcomes` by version and time (the paired counts and the monitor read a
version's recent outcomes) and by time (retention).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scores",
        sa.Column("prediction_id", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prediction_id", "model_version", name="pk_scores"),
    )
    op.create_index("ix_scores_created_at", "scores", ["created_at"])
    op.create_table(
        "outcomes",
        sa.Column("prediction_id", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("answered", sa.Boolean(), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("predicted", sa.String(200), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=False),
        sa.Column("p_true", sa.Float(), nullable=False),
        sa.Column("log_loss", sa.Float(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("predicted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prediction_id", "model_version", name="pk_outcomes"),
    )
    op.create_index(
        "ix_outcomes_model_version_labelled_at", "outcomes", ["model_version", "labelled_at"]
    )
    op.create_index("ix_outcomes_labelled_at", "outcomes", ["labelled_at"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_labelled_at", table_name="outcomes")
    op.drop_index("ix_outcomes_model_version_labelled_at", table_name="outcomes")
    op.drop_table("outcomes")
    op.drop_index("ix_scores_created_at", table_name="scores")
    op.drop_table("scores")
