"""Feedback: turns logged predictions and corrections into training examples.

Its training store (`flywheel.feedback.store`) is the hand-off to the learner.
"""

from flywheel.feedback.store import (
    CORRECTION_STATUSES,
    ERROR_TYPES,
    ORIGINS,
    SPLITS,
    Base,
    Correction,
    CorrectionStatus,
    ErrorType,
    Example,
    LearnerState,
    Origin,
    Prediction,
    SchemaNotCurrent,
    SchemaTooNew,
    Split,
    check_schema,
    current,
    downgrade,
    head,
    insert_ignoring_duplicates,
    make_engine,
    open_store,
    session_factory,
    upgrade,
)

__all__ = [
    "CORRECTION_STATUSES", "ERROR_TYPES", "ORIGINS", "SPLITS", "Base", "Correction",
    "CorrectionStatus", "ErrorType", "Example", "LearnerState", "Origin", "Prediction",
    "SchemaNotCurrent", "SchemaTooNew", "Split", "check_schema", "current", "downgrade", "head",
    "insert_ignoring_duplicates", "make_engine", "open_store", "session_factory", "upgrade",
]
