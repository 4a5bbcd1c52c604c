"""The shared training store: predictions, corrections, examples, learner cursors, the
privacy ledger, and the trusted seed data every component agrees on.

One component that the others meet through: feedback writes it, the learner, privacy and
review read and write it; it imports none of them (tests/unit/test_layers.py checks).

Open it with `open_store(url)`, which refuses a database whose schema is not the one
this code expects; change the schema only through `upgrade`/`downgrade` (Alembic).
"""

from flywheel.store.bulk import (
    CopyRows,
    EncodedRows,
    copy_all_new,
    encode_columns,
    encode_for_copy,
    insert_all_new,
    insert_ignoring_duplicates,
    insert_returning_new,
)
from flywheel.store.database import (
    SchemaNotCurrent,
    SchemaTooNew,
    check_schema,
    display_url,
    driver_connection,
    make_engine,
    normalize_url,
    open_store,
    schema_revision,
    session_factory,
)
from flywheel.store.error_counts import CounterRow, error_counters
from flywheel.store.examples import ExampleReader, StoredExample
from flywheel.store.ledger import LedgerRow, LedgerTables, SourceSpend
from flywheel.store.migrate import (
    alembic_config,
    current,
    downgrade,
    head,
    known_revisions,
    upgrade,
)
from flywheel.store.models import (
    CORRECTION_STATUSES,
    ERROR_TYPES,
    NO_SOURCE,
    ORIGINS,
    SPLITS,
    Base,
    Correction,
    CorrectionStatus,
    CounterexampleUsage,
    ErrorCount,
    ErrorType,
    Example,
    LearnerState,
    Origin,
    Prediction,
    PrivacyLedgerEntry,
    PrivacySourceSpend,
    Split,
    UTCDateTime,
)
from flywheel.store.models import ReferenceStats as ReferenceStatsRow
from flywheel.store.trusted import HOLDOUT_FRACTION, seed_data

__all__ = [
    "CORRECTION_STATUSES",
    "ERROR_TYPES",
    "NO_SOURCE",
    "ORIGINS",
    "SPLITS",
    "Base",
    "Correction",
    "CopyRows",
    "CorrectionStatus",
    "CounterexampleUsage",
    "EncodedRows",
    "ErrorCount",
    "ErrorType",
    "CounterRow",
    "error_counters",
    "ExampleReader",
    "StoredExample",
    "Example",
    "LedgerRow",
    "LedgerTables",
    "SourceSpend",
    "HOLDOUT_FRACTION",
    "ReferenceStatsRow",
    "UTCDateTime",
    "seed_data",
    "LearnerState",
    "Origin",
    "Prediction",
    "PrivacyLedgerEntry",
    "PrivacySourceSpend",
    "copy_all_new",
    "encode_columns",
    "encode_for_copy",
    "insert_all_new",
    "SchemaNotCurrent",
    "SchemaTooNew",
    "Split",
    "alembic_config",
    "check_schema",
    "current",
    "display_url",
    "downgrade",
    "driver_connection",
    "head",
    "insert_ignoring_duplicates",
    "insert_returning_new",
    "known_revisions",
    "make_engine",
    "normalize_url",
    "open_store",
    "schema_revision",
    "session_factory",
    "upgrade",
]
