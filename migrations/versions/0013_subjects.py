"""Privacy: data subjects as the privacy unit (issue 25, part 4).

Adds two nullable columns and their indexes, nothing else (no row is rewritten, so the
upgrade is as quick on a large store as on an empty one):
* `corrections.subject`: the subject's keyed hash (`flywheel.subjects`), kept while a
  correction waits for its prediction; a partial index over the rows that have one, for
  erasure by subject (issue 30);
* `examples.privacy_unit`: whose data an example is, for DP accounting (`subject:<hash>`
  or `prediction:<id>`), indexed: erasing a subject is one indexed delete.

Existing rows keep NULL and stay readable: an example stored before this migration is
accounted under its source, as it was when its ε was written to the ledger
(`flywheel.store.StoredExample.contributor`), so old ledgers and the report on them stay
right. The ledger's tables are unchanged: their `source` column holds the unit.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUBJECT_INDEX = "ix_corrections_subject"
SUBJECT_PREDICATE = "subject IS NOT NULL"
UNIT_INDEX = "ix_examples_privacy_unit"


def upgrade() -> None:
    op.add_column("corrections", sa.Column("subject", sa.String(64), nullable=True))
    op.create_index(
        SUBJECT_INDEX,
        "corrections",
        ["subject"],
        postgresql_where=sa.text(SUBJECT_PREDICATE),
        sqlite_where=sa.text(SUBJECT_PREDICATE),
    )
    op.add_column("examples", sa.Column("privacy_unit", sa.String(80), nullable=True))
    op.create_index(UNIT_INDEX, "examples", ["privacy_unit"])


def downgrade() -> None:
    op.drop_index(UNIT_INDEX, table_name="examples")
    # a plain DROP COLUMN (SQLite >= 3.35 has it): a batch copy of `examples` would lose
    # its counterexample trigger (0006)
    op.drop_column("examples", "privacy_unit")
    op.drop_index(SUBJECT_INDEX, table_name="corrections")
    op.drop_column("corrections", "subject")
