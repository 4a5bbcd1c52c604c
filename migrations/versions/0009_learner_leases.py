"""Learner: one writer per lineage (a lease with a fencing token); ledger rows by id.

`learner_leases` holds, per lineage, who may write for it, until when and under which
fencing token (issue 27: two learners of one lineage trained the same examples twice and
lost ledger rows). The privacy ledger's (lineage, update_no) stops being unique: a row is
never replaced any more, so a re-run of an update whose learner died before publishing
adds a row, and the dead one keeps counting (over-count, never under-count). Every
existing row is kept.

On SQLite, dropping the constraint rebuilds `privacy_ledger` (batch mode), and dropping
the old table would cascade into `privacy_source_spend` (its foreign key deletes on
cascade, and foreign keys are on): the spends are copied aside and put back.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op
from alembic.operations import BatchOperations

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNIQUE = "uq_privacy_ledger_lineage_update_no"
INDEX = "ix_privacy_ledger_lineage_update_no"
KEEP = "_privacy_source_spend_0009"


def _rebuild_ledger(change: Callable[[BatchOperations], None]) -> None:
    """Run `change(batch)` on privacy_ledger, keeping privacy_source_spend's rows."""
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute(f"CREATE TABLE {KEEP} AS SELECT * FROM privacy_source_spend")
    with op.batch_alter_table("privacy_ledger") as batch:
        change(batch)
    if sqlite:
        op.execute("DELETE FROM privacy_source_spend")
        op.execute(
            "INSERT INTO privacy_source_spend (ledger_id, source, examples, epsilon) "
            f"SELECT ledger_id, source, examples, epsilon FROM {KEEP}"
        )
        op.execute(f"DROP TABLE {KEEP}")


def upgrade() -> None:
    op.create_table(
        "learner_leases",
        sa.Column("lineage", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("token", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("renewed_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("lineage", name="pk_learner_leases"),
    )

    def change(batch: BatchOperations) -> None:
        batch.drop_constraint(UNIQUE, type_="unique")
        batch.create_index(INDEX, ["lineage", "update_no"])

    _rebuild_ledger(change)


def downgrade() -> None:
    """Refused while two rows share an update number: going back would have to drop one,
    and a ledger row is never dropped (it would under-count ε)."""
    dup = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT lineage, update_no FROM privacy_ledger "
                "GROUP BY lineage, update_no HAVING COUNT(*) > 1"
            )
        )
        .first()
    )
    if dup is not None:
        raise RuntimeError(
            f"privacy_ledger has several rows for update {dup[1]} of {dup[0]}: revision 0008 "
            "allows one; downgrading would drop ledger rows (an under-count of ε)"
        )

    def change(batch: BatchOperations) -> None:
        batch.drop_index(INDEX)
        batch.create_unique_constraint(UNIQUE, ["lineage", "update_no"])

    _rebuild_ledger(change)
    op.drop_table("learner_leases")
