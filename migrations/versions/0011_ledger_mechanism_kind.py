"""Privacy ledger: the kind of each entry's mechanism (DP-SGD or DP-FTRL's tree).

An entry's (sample rate, σ, steps) no longer says how to account it once DP-FTRL is an
engine choice: a tree of 8 leaves at σ = 4.22 spends ε ≈ 2.1 where 8 DP-SGD steps at
q = 1 and the same σ spend ≈ 3.2. The new column says which; every existing row was
written by DP-SGD, so it gets "dp-sgd" (server default) and its ε reads back unchanged.
No key, index or existing column changes, and no table is rebuilt (a plain ADD COLUMN on
PostgreSQL and SQLite), so privacy_source_spend's cascading rows are never at risk.

Downgrade keeps the column: SQLite runs DDL outside the migration's transaction, so a
dropped column would stay dropped when an older step's downgrade then refuses (0009
refuses while an update number has two rows), and the kinds would be lost. Code at 0010
never reads the column (the server default fills it for rows it writes) and would
account a tree as DP-SGD steps at q = 1, which over-counts its ε (a tree of T leaves is
at most ⌈log2 T⌉ + 1 Gaussian releases per record, T steps are T), never under-counts.
Upgrading again finds the column and keeps it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMN = "mechanism_kind"


def upgrade() -> None:
    columns = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("privacy_ledger")}
    if COLUMN not in columns:  # absent unless a downgrade from 0011 left it
        op.add_column(
            "privacy_ledger",
            sa.Column(COLUMN, sa.String(16), nullable=False, server_default="dp-sgd"),
        )


def downgrade() -> None:
    """Keeps the column and its kinds (see the module docstring)."""
