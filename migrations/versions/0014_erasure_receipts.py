"""Erasure receipts: one row per erasure of a data subject (issue 30).

A new table, so existing data is untouched: `erasure_receipts` holds when, the subject's
keyed hash (never the raw id), the rows deleted per table, who asked, and the subject's
first stored example id; indexed by subject, which the feedback workers look up before
storing a correction with one (a replay from Kafka after an erasure is not stored again).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "erasure_receipts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requested_by", sa.String(100), nullable=False),
        sa.Column("deleted", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("first_example_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_erasure_receipts"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_erasure_receipts_subject", "erasure_receipts", ["subject"])


def downgrade() -> None:
    op.drop_index("ix_erasure_receipts_subject", table_name="erasure_receipts")
    op.drop_table("erasure_receipts")
