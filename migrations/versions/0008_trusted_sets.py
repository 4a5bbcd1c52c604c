"""Learner: the trusted data set a lineage starts from (`flywheel init`).

One row per registered model: the feature schema (JSON), the data set's fingerprint, the
split rule and per-label counts, and whether the data may be used without privacy
accounting. The rows themselves stay `examples` with origin `seed`, as before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "trusted_sets",
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("schema", JSON, nullable=False),
        sa.Column("public", sa.Boolean(), nullable=False),
        sa.Column("rows_train", sa.BigInteger(), nullable=False),
        sa.Column("rows_holdout", sa.BigInteger(), nullable=False),
        sa.Column("split_rule", sa.String(200), nullable=False),
        sa.Column("label_counts", JSON, nullable=False),
        sa.Column("source", sa.String(1000), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("model_name", name="pk_trusted_sets"),
    )


def downgrade() -> None:
    op.drop_table("trusted_sets")
