"""The training store's tables: what the feedback loop keeps and the learner consumes.

The same models run on PostgreSQL and SQLite, so types are portable (JSON becomes
JSONB on PostgreSQL, except the events' documents, kept as `json`) and enumerated strings
are CHECK constraints rather than native enums, which SQLite lacks and which are painful
to migrate on PostgreSQL.
Constraint and index names come from one naming convention so Alembic sees the
same names on both databases and can alter them later.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Origin(StrEnum):
    """How an example entered the store."""

    SEED = "seed"
    CORRECTION = "correction"
    COUNTEREXAMPLE = "counterexample"
    MANUAL = "manual"


class Split(StrEnum):
    """Which use an example is reserved for; quarantine is never trained on."""

    TRAIN = "train"
    HOLDOUT = "holdout"
    QUARANTINE = "quarantine"


class ErrorType(StrEnum):
    """Why a corrected prediction was wrong, for examples born from corrections."""

    CONFIDENT = "confident"
    BOUNDARY = "boundary"
    NOVEL = "novel"
    SUSPECT = "suspect"


class CorrectionStatus(StrEnum):
    """A correction waits (pending) until its prediction arrives (joined) or times out."""

    PENDING = "pending"
    JOINED = "joined"
    EXPIRED = "expired"


ORIGINS: tuple[str, ...] = tuple(m.value for m in Origin)
SPLITS: tuple[str, ...] = tuple(m.value for m in Split)
ERROR_TYPES: tuple[str, ...] = tuple(m.value for m in ErrorType)
CORRECTION_STATUSES: tuple[str, ...] = tuple(m.value for m in CorrectionStatus)

ID_LENGTH = 64  # flywheel.events.Identifier
NAME_LENGTH = 200  # flywheel.events.LabelName and Settings.model_name


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """SQL for a CHECK that a string column holds one of `values` (NULL passes)."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that always returns aware UTC datetimes.

    SQLite has no time zone type and hands back naive values; normalising here means
    code comparing timestamps behaves the same on both databases. Naive inputs are
    rejected because guessing their zone silently shifts data.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the training store needs aware times")
        value = value.astimezone(UTC)
        # SQLite stores the text form; dropping the offset keeps values sortable as text.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")
# An event's document, written once and read back whole, never searched inside: PostgreSQL's
# `json` keeps the text as sent, which costs the server ~30 % less CPU a row to take in
# than `jsonb`'s parse into its binary form, and nothing to hand back (migration 0007).
JSONDocument = JSON()
# SQLite only autoincrements an INTEGER PRIMARY KEY, not BIGINT.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Prediction(Base):
    """One served prediction, as logged on `flywheel.predictions`.

    On PostgreSQL the table is partitioned by day of `created_at` (migration 0013) and its
    primary key is `(id, created_at)`, as a partitioned table's keys must hold the partition
    key; the mapping keeps `id` alone, what every query looks rows up by. Why ids stay
    unique and joins exactly-once: `flywheel.store.partitions`."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    model_version: Mapped[str] = mapped_column(String(ID_LENGTH))
    features: Mapped[list[float]] = mapped_column(JSONDocument)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSONDocument)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    latency_ms: Mapped[float] = mapped_column(Float)
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime(), server_default=func.now())


PENDING_INDEX = "ix_corrections_pending_prediction_id"
PENDING_PREDICATE = "status = 'pending'"
SUBJECT_INDEX = "ix_corrections_subject"
SUBJECT_PREDICATE = "subject IS NOT NULL"
SUBJECT_LENGTH = 64  # a keyed hash, hex (flywheel.subjects)
UNIT_LENGTH = ID_LENGTH + 16  # `subject:<hash>` or `prediction:<id>`, as the ledger's units


class Correction(Base):
    """A true label for a prediction; its id is the event id so redelivery is a no-op.

    `prediction_id` is deliberately not a foreign key: corrections can arrive before
    the prediction they refer to, and wait as `pending` until it does.
    """

    __tablename__ = "corrections"
    __table_args__ = (
        CheckConstraint(_one_of("status", CORRECTION_STATUSES), name="status"),
        # Only pending rows are indexed (a new prediction's claim, the sweep's late joins,
        # the expiry): a correction joined as it is written enters no index but its key
        # (migration 0005).
        Index(
            PENDING_INDEX,
            "prediction_id",
            postgresql_where=text(PENDING_PREDICATE),
            sqlite_where=text(PENDING_PREDICATE),
        ),
        # erasure by subject (issue 30): only corrections with a subject enter it (0011)
        Index(
            SUBJECT_INDEX,
            "subject",
            postgresql_where=text(SUBJECT_PREDICATE),
            sqlite_where=text(SUBJECT_PREDICATE),
        ),
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    prediction_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))
    source: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    # the data subject's keyed hash (never a raw id): kept while the correction waits for
    # its prediction, so the examples made at the join carry the subject as their unit
    subject: Mapped[str | None] = mapped_column(String(SUBJECT_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(
        String(16),
        default=CorrectionStatus.PENDING.value,
        server_default=CorrectionStatus.PENDING.value,
    )
    joined_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


QUARANTINE_INDEX = "ix_examples_quarantine"
QUARANTINE_PREDICATE = "split = 'quarantine'"


class Example(Base):
    """A labelled training example; the learner reads them in id order.

    `dedup_key` is unique so whoever writes an example can simply write it again after
    a crash. `id` only grows (AUTOINCREMENT on SQLite) because learners keep a cursor.
    """

    __tablename__ = "examples"
    __table_args__ = (
        CheckConstraint(_one_of("origin", ORIGINS), name="origin"),
        CheckConstraint(_one_of("split", SPLITS), name="split"),
        CheckConstraint(_one_of("error_type", ERROR_TYPES), name="error_type"),
        CheckConstraint("weight > 0", name="weight_positive"),
        # The corroboration sweep looks for quarantined rows, which are few; no other
        # query filters by split through an index (migration 0005).
        Index(
            QUARANTINE_INDEX,
            "id",
            postgresql_where=text(QUARANTINE_PREDICATE),
            sqlite_where=text(QUARANTINE_PREDICATE),
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(200), unique=True)
    origin: Mapped[str] = mapped_column(String(32))
    error_type: Mapped[str | None] = mapped_column(String(32))
    parent_prediction_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    features: Mapped[list[float]] = mapped_column(JSONDocument)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default=text("1.0"))
    split: Mapped[str] = mapped_column(String(16))
    source: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )
    # whose data this is, for DP accounting (flywheel.subjects.privacy_unit): indexed, so
    # erasing a subject is one indexed delete; NULL on rows stored before 0012 (their unit
    # is their source) and on seed rows (public)
    privacy_unit: Mapped[str | None] = mapped_column(String(UNIT_LENGTH), index=True)


NO_SOURCE = ""  # `counterexample_usage.source` of counterexamples without one


class CounterexampleUsage(Base):
    """Counterexamples stored per source and minute: what the per-source budget reads.

    Written only by a trigger on `examples` (migration 0006), which counts the rows an
    INSERT or COPY actually stored: a replay that stores nothing new adds nothing, and
    every writer is counted. The budget check then sums at most a window's minutes per
    source instead of counting the source's counterexamples row by row.
    """

    __tablename__ = "counterexample_usage"

    source: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    minute: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class LearnerState(Base):
    """Where one learner lineage has read up to, plus whatever state it checkpoints."""

    __tablename__ = "learner_state"

    lineage: Mapped[str] = mapped_column(String(200), primary_key=True)
    cursor: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    state: Mapped[dict[str, Any]] = mapped_column(
        JSONType, default=dict, server_default=text("'{}'")
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now()
    )


class LearnerLease(Base):
    """Who may write for a learner lineage, until when, under which fencing token.

    Times are seconds since the epoch on the database's clock (one clock for every holder,
    whatever the hosts' clocks say); the token grows by one at every change of holder and
    every write the learner makes checks it (flywheel/store/lease.py).
    """

    __tablename__ = "learner_leases"

    lineage: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    token: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[float] = mapped_column(Float)
    renewed_at: Mapped[float] = mapped_column(Float)


class ReferenceStats(Base):
    """The training distribution a lineage's novelty scores are measured against."""

    __tablename__ = "reference_stats"

    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    stats: Mapped[dict[str, Any]] = mapped_column(JSONType)
    example_count: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow, server_default=func.now()
    )


class TrustedSet(Base):
    """The data set a lineage started from (`flywheel init`): its schema, fingerprint,
    how it was split, and whether it may be used without privacy accounting.

    Its rows are `examples` with origin `seed` (split `train` or `holdout`), written in
    the same transaction as this row, so a failed `init` leaves neither.
    """

    __tablename__ = "trusted_sets"

    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    schema: Mapped[dict[str, Any]] = mapped_column(JSONType)
    public: Mapped[bool] = mapped_column(Boolean)
    rows_train: Mapped[int] = mapped_column(BigInteger)
    rows_holdout: Mapped[int] = mapped_column(BigInteger)
    split_rule: Mapped[str] = mapped_column(String(200))
    label_counts: Mapped[dict[str, Any]] = mapped_column(JSONType)
    source: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )


APP_NAME_LENGTH = 32  # flywheel.appkeys.APP_NAME_PATTERN


class App(Base):
    """An app that calls the service (`flywheel apps create`): its name is the source of
    its corrections, its scopes what its keys may do. Revoked: every key refused."""

    __tablename__ = "apps"

    name: Mapped[str] = mapped_column(String(APP_NAME_LENGTH), primary_key=True)
    scopes: Mapped[str] = mapped_column(String(64))  # comma-separated, flywheel.appkeys.SCOPES
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AppKey(Base):
    """One key of an app: only its SHA-256 and the signing secret derived from it are kept
    (flywheel.appkeys). A rotation adds a key and gives the old ones an `expires_at` at the
    end of the grace period."""

    __tablename__ = "app_keys"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    app: Mapped[str] = mapped_column(
        String(APP_NAME_LENGTH), ForeignKey("apps.name", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[str] = mapped_column(String(64))
    signing_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ErrorCount(Base):
    """Joined corrections per model version, hour, (predicted, true) pair and outcome.

    Counters, not rows per event: a rolling report is a sum over recent hours, and two
    workers add to the same row with an atomic upsert.
    """

    __tablename__ = "error_counts"
    __table_args__ = (
        CheckConstraint(_one_of("outcome", ("correct", *ERROR_TYPES)), name="outcome"),
    )

    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    predicted: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    actual: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


__all__ = [
    "APP_NAME_LENGTH",
    "App",
    "AppKey",
    "CORRECTION_STATUSES",
    "ERROR_TYPES",
    "NAMING_CONVENTION",
    "NO_SOURCE",
    "ORIGINS",
    "SPLITS",
    "Base",
    "Correction",
    "CorrectionStatus",
    "CounterexampleUsage",
    "ErrorCount",
    "ErrorType",
    "Example",
    "LearnerState",
    "Origin",
    "Prediction",
    "ReferenceStats",
    "Split",
    "UTCDateTime",
    "utcnow",
]


class PrivacyLedgerEntry(Base):
    """One DP update of a lineage: its mechanism and the ε it spent (privacy/ writes it).

    The table lives with the rest of the store's schema so one Alembic chain migrates
    everything; `flywheel.privacy.PrivacyLedger` is the only code that reads or writes it.
    """

    __tablename__ = "privacy_ledger"
    # (lineage, update_no) is not unique (0009): a row is never replaced, so a re-run of an
    # update whose learner died before publishing adds a row, and the dead one keeps counting
    __table_args__ = (
        Index("ix_privacy_ledger_lineage_update_no", "lineage", "update_no"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    lineage: Mapped[str] = mapped_column(String(200), index=True)
    update_no: Mapped[int] = mapped_column(Integer)
    version: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )
    accountant: Mapped[str] = mapped_column(String(8))
    engine: Mapped[str] = mapped_column(String(16))
    sample_rate: Mapped[float] = mapped_column(Float)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    max_grad_norm: Mapped[float] = mapped_column(Float)
    steps: Mapped[int] = mapped_column(Integer)
    delta: Mapped[float] = mapped_column(Float)
    epsilon_update: Mapped[float] = mapped_column(Float)
    epsilon_lineage: Mapped[float] = mapped_column(Float)
    sources: Mapped[int] = mapped_column(Integer)
    examples: Mapped[int] = mapped_column(Integer)
    public_examples: Mapped[int] = mapped_column(Integer)
    capped_examples: Mapped[int] = mapped_column(Integer)
    excluded_examples: Mapped[int] = mapped_column(Integer)
    # "dp-sgd" (Poisson-subsampled Gaussian steps) or "tree" (DP-FTRL's tree aggregation,
    # 0011); rows written before 0011 are DP-SGD
    mechanism_kind: Mapped[str] = mapped_column(
        String(16), default="dp-sgd", server_default="dp-sgd"
    )


class PrivacySourceSpend(Base):
    """Which sources took part in which ledger entry, and their ε after it."""

    __tablename__ = "privacy_source_spend"

    ledger_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("privacy_ledger.id", ondelete="CASCADE"), primary_key=True
    )
    source: Mapped[str] = mapped_column(String(ID_LENGTH + 16), primary_key=True, index=True)
    examples: Mapped[int] = mapped_column(Integer)
    epsilon: Mapped[float] = mapped_column(Float)


REQUESTER_LENGTH = 100  # `app:<name>` of an admin key, or `cli:<os user>`


class ErasureReceipt(Base):
    """One erasure of a data subject (`flywheel privacy forget`, `POST /v1/admin/forget`).

    Holds the subject's keyed hash (flywheel.subjects), never the raw id; the rows deleted
    per table; who asked; and the subject's first stored example id, from which the
    versions trained without DP on the subject's data are listed again later. Every call
    writes one, a repeated one with 0 rows. The feedback workers read it (by the indexed
    `subject`) so a correction of an erased subject replayed from Kafka is not stored again.
    """

    __tablename__ = "erasure_receipts"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(SUBJECT_LENGTH), index=True)
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime())
    requested_by: Mapped[str] = mapped_column(String(REQUESTER_LENGTH))
    deleted: Mapped[dict[str, int]] = mapped_column(JSONType)
    first_example_id: Mapped[int | None] = mapped_column(BigInteger)


ROLE_LENGTH = 16  # `champion`, `canary`, `shadow`, `guard` (flywheel.settings.LIVE_ROLES)


class Score(Base):
    """A version's score of a served prediction it did not answer (issue 28): a shadow or
    guard scoring beside the champion, or the champion scoring a request a canary answered.

    Written by the feedback worker from `flywheel.scores` events (`ScoreEvent`); keyed by
    (prediction, version), so a redelivered event is one row. The answering version's
    own score is the `predictions` row itself.
    """

    __tablename__ = "scores"
    __table_args__ = (Index("ix_scores_created_at", "created_at"),)

    prediction_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    role: Mapped[str] = mapped_column(String(ROLE_LENGTH))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSONDocument)
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Outcome(Base):
    """One version's result on one labelled prediction: what live evaluation counts.

    Credited once per (prediction, version) -- for the version that answered and for each
    one that scored the prediction -- when the first correction of the prediction joins
    it, or when a score arrives for an already-labelled prediction; whichever comes
    last writes the row, and the key makes a replay write nothing. Two versions are
    compared paired: on the predictions both have an outcome for.
    """

    __tablename__ = "outcomes"
    __table_args__ = (
        Index("ix_outcomes_model_version_labelled_at", "model_version", "labelled_at"),
        Index("ix_outcomes_labelled_at", "labelled_at"),
    )

    prediction_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    answered: Mapped[bool] = mapped_column(Boolean)  # its answer was the one returned
    label: Mapped[str] = mapped_column(String(NAME_LENGTH))  # the true label
    predicted: Mapped[str] = mapped_column(String(NAME_LENGTH))  # its own label
    correct: Mapped[bool] = mapped_column(Boolean)
    p_true: Mapped[float] = mapped_column(Float)  # the probability it gave the true label
    log_loss: Mapped[float] = mapped_column(Float)  # -ln(max(p_true, 1e-15))
    confidence: Mapped[float] = mapped_column(Float)  # its largest probability
    predicted_at: Mapped[datetime] = mapped_column(UTCDateTime())
    labelled_at: Mapped[datetime] = mapped_column(UTCDateTime())
