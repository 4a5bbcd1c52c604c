"""Feedback: reference statistics for novelty, and error counters for reports.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
OUTCOMES = ("correct", "confident", "boundary", "novel", "suspect")


def upgrade() -> None:
    op.create_table(
        "reference_stats",
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("stats", JSON, nullable=False),
        sa.Column("example_count", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("model_name", name="pk_reference_stats"),
    )
    op.create_table(
        "error_counts",
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("predicted", sa.String(200), nullable=False),
        sa.Column("actual", sa.String(200), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            f"outcome IN ({', '.join(repr(v) for v in OUTCOMES)})", name="ck_error_counts_outcome"
        ),
        sa.PrimaryKeyConstraint(
            "model_name",
            "model_version",
            "hour",
            "predicted",
            "actual",
            "outcome",
            name="pk_error_counts",
        ),
    )


def downgrade() -> None:
    op.drop_table("error_counts")
    op.drop_table("reference_stats")
