"""Service: app identities and their keys (`flywheel apps`).

`apps` holds each app's name (the source of its corrections) and scopes; `app_keys` one
row per key, with the key's SHA-256 (never the key), the signing secret derived from it
for Kafka corrections, and its creation, expiry and last use.

Numbered 0010 with 0008 as its parent: a learner-lease migration 0009 was written at the
same time on another branch; the merge chains the two (0010 then revises 0009).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "apps",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("scopes", sa.String(64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_apps"),
    )
    op.create_table(
        "app_keys",
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("app", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("signing_key", sa.String(64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["app"], ["apps.name"], name="fk_app_keys_app_apps", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("key_id", name="pk_app_keys"),
    )
    op.create_index("ix_app_keys_app", "app_keys", ["app"])


def downgrade() -> None:
    op.drop_index("ix_app_keys_app", table_name="app_keys")
    op.drop_table("app_keys")
    op.drop_table("apps")
