"""Privacy: the ledger of DP updates and the sources that took part in each.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "privacy_ledger",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("lineage", sa.String(200), nullable=False),
        sa.Column("update_no", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("accountant", sa.String(8), nullable=False),
        sa.Column("engine", sa.String(16), nullable=False),
        sa.Column("sample_rate", sa.Float(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("max_grad_norm", sa.Float(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("epsilon_update", sa.Float(), nullable=False),
        sa.Column("epsilon_lineage", sa.Float(), nullable=False),
        sa.Column("sources", sa.Integer(), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("public_examples", sa.Integer(), nullable=False),
        sa.Column("capped_examples", sa.Integer(), nullable=False),
        sa.Column("excluded_examples", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_privacy_ledger"),
        sa.UniqueConstraint("lineage", "update_no", name="uq_privacy_ledger_lineage_update_no"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_privacy_ledger_lineage", "privacy_ledger", ["lineage"])
    op.create_table(
        "privacy_source_spend",
        sa.Column("ledger_id", BIG_ID, nullable=False),
        sa.Column("source", sa.String(80), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("epsilon", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ledger_id"],
            ["privacy_ledger.id"],
            ondelete="CASCADE",
            name="fk_privacy_source_spend_ledger_id_privacy_ledger",
        ),
        sa.PrimaryKeyConstraint("ledger_id", "source", name="pk_privacy_source_spend"),
    )
    op.create_index("ix_privacy_source_spend_source", "privacy_source_spend", ["source"])


def downgrade() -> None:
    op.drop_table("privacy_source_spend")
    op.drop_table("privacy_ledger")
