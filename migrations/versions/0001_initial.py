"""Initial training store: predictions, corrections, examples, learner_state.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand with every name spelled out, so the schema this creates never depends
on what the models look like when it runs. Enumerated values are frozen here too: a
later change to the models' allowed values needs its own migration.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _one_of(column: str, *values: str) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("features", JSON, nullable=False),
        sa.Column("probabilities", JSON, nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("stored_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    op.create_index(
        op.f("ix_predictions_model_name_model_version"),
        "predictions",
        ["model_name", "model_version"],
    )

    op.create_table(
        "corrections",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("prediction_id", sa.String(64), nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("status", sa.String(16), server_default="pending", nullable=False),
        sa.Column("joined_at", _tz(), nullable=True),
        sa.CheckConstraint(
            _one_of("status", "pending", "joined", "expired"), name=op.f("ck_corrections_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
    )
    op.create_index(op.f("ix_corrections_prediction_id"), "corrections", ["prediction_id"])
    op.create_index(op.f("ix_corrections_status"), "corrections", ["status"])

    op.create_table(
        "examples",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("dedup_key", sa.String(200), nullable=False),
        sa.Column("origin", sa.String(32), nullable=False),
        sa.Column("error_type", sa.String(32), nullable=True),
        sa.Column("parent_prediction_id", sa.String(64), nullable=True),
        sa.Column("features", JSON, nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("weight", sa.Float(), server_default=sa.text("1.0"), nullable=False),
        sa.Column("split", sa.String(16), nullable=False),
        sa.Column("source", sa.String(64), nullable=True),
        sa.Column("created_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            _one_of("origin", "seed", "correction", "counterexample", "manual"),
            name=op.f("ck_examples_origin"),
        ),
        sa.CheckConstraint(
            _one_of("split", "train", "holdout", "quarantine"), name=op.f("ck_examples_split")
        ),
        sa.CheckConstraint(
            _one_of("error_type", "confident", "boundary", "novel", "suspect"),
            name=op.f("ck_examples_error_type"),
        ),
        sa.CheckConstraint("weight > 0", name=op.f("ck_examples_weight_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_examples")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_examples_dedup_key")),
        # Ids must only grow (learners keep a cursor); plain SQLite rowids can be reused.
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_examples_parent_prediction_id"), "examples", ["parent_prediction_id"])
    op.create_index(op.f("ix_examples_split"), "examples", ["split"])

    op.create_table(
        "learner_state",
        sa.Column("lineage", sa.String(200), nullable=False),
        sa.Column("cursor", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("state", JSON, server_default=sa.text("'{}'"), nullable=False),
        sa.Column("updated_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("lineage", name=op.f("pk_learner_state")),
    )


def downgrade() -> None:
    op.drop_table("learner_state")
    op.drop_index(op.f("ix_examples_split"), table_name="examples")
    op.drop_index(op.f("ix_examples_parent_prediction_id"), table_name="examples")
    op.drop_table("examples")
    op.drop_index(op.f("ix_corrections_status"), table_name="corrections")
    op.drop_index(op.f("ix_corrections_prediction_id"), table_name="corrections")
    op.drop_table("corrections")
    op.drop_index(op.f("ix_predictions_model_name_model_version"), table_name="predictions")
    op.drop_table("predictions")
