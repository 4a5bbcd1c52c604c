"""Feedback: features and probabilities as PostgreSQL `json`, not `jsonb`.

Every prediction the feedback worker stores carries its features and probabilities, and
every example its features; nothing queries inside them -- they are read back whole (the
join, the learner, the corroboration sweep). `jsonb` parses each document into its binary
form on the way in and prints it back on the way out; `json` checks the text and keeps
it. COPYing 50,000 prediction rows cost the server 0.85-0.93 s of CPU with `jsonb` and
0.57-0.68 s with `json` (docs/benchmarks.md). The one thing `json` lacks is equality
(no DISTINCT or GROUP BY on these columns), which no query uses.

SQLite has a single JSON type: nothing changes there. On PostgreSQL the ALTERs rewrite
both tables, once each.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = {"predictions": ("features", "probabilities"), "examples": ("features",)}


def _retype(to: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        op.execute(
            f"ALTER TABLE {table} "
            + ", ".join(f"ALTER COLUMN {c} TYPE {to} USING {c}::{to}" for c in columns)
        )


def upgrade() -> None:
    _retype("json")


def downgrade() -> None:
    _retype("jsonb")
