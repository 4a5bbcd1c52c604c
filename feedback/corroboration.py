"""Releasing quarantined corrections once other corrections corroborate them.

A correction that contradicts a confident model *and* its labelled neighbourhood is held
out of training (split `quarantine`). After a real concept change every early correction
looks like that, so quarantine must not be forever: once enough other corrections close
by carry the same label, the quarantined one is released to its normal split. The rule
reads only what is in the store, so every worker, and a replay after a crash, agrees.
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from flywheel.feedback.analyzer import assign_split
from flywheel.feedback.reference import ReferenceStats
from flywheel.feedback.store import ErrorType, Example, Origin, Split

MIN_SUPPORT = 3
RADIUS = 1.5  # standardized units, as the analyzer's neighbour radius
SUPPORT_POOL = 20_000


def release_corroborated(session: Session, reference: ReferenceStats, holdout_fraction: float,
                         *, min_support: int = MIN_SUPPORT, radius: float = RADIUS,
                         limit: int = 2000) -> int:
    held = session.execute(
        select(Example.id, Example.features, Example.label, Example.parent_prediction_id)
        .where(Example.split == Split.QUARANTINE.value,
               Example.origin == Origin.CORRECTION.value,
               Example.error_type == ErrorType.SUSPECT.value)
        .order_by(Example.id).limit(limit)).all()
    if not held:
        return 0
    support = session.execute(
        select(Example.features, Example.label, Example.parent_prediction_id)
        .where(Example.origin == Origin.CORRECTION.value)
        .order_by(Example.id.desc()).limit(SUPPORT_POOL)).all()
    xs = np.asarray([r[0] for r in support], dtype=np.float64)
    labels = np.asarray([r[1] for r in support])
    parents = np.asarray([r[2] for r in support])
    released = 0
    for ex_id, features, label, parent in held:
        d = np.linalg.norm((xs - np.asarray(features)) / reference.std, axis=1)
        agree = int(((d <= radius) & (labels == label) & (parents != parent)).sum())
        if agree >= min_support:
            released += session.execute(
                update(Example).where(Example.id == ex_id,
                                      Example.split == Split.QUARANTINE.value)
                .values(split=assign_split(parent, holdout_fraction))).rowcount or 0
    return released
