"""A trusted data set in a test's store, as `flywheel init` leaves one.

Every reader of the trusted data (the learner's gate and replay, the feedback worker's
reference and neighbours, the federated server, review) reads it from the store. Tests
that start from the synthetic seed problem (`ensure_champion` trains the first model on
it) write that problem as the lineage's trusted set here: schema `x0..x7` numeric, labels
`class_0..2`, the last 20 % the holdout, plus its reference statistics row.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def write_synthetic_trusted(
    settings: Any, *, database_url: str | None = None, public: bool = True
) -> bool:
    """Write the synthetic problem of `settings.trusted` as the trusted set of
    `settings.model_name` (and its reference statistics) into the migrated store at
    `database_url` (default: the settings'); False if the lineage had one already."""
    from flywheel.feedback import ReferenceStats
    from flywheel.store import (
        ReferenceStatsRow,
        insert_ignoring_duplicates,
        make_engine,
        require_trusted,
        session_factory,
        write_seed_trusted,
    )

    engine = make_engine(database_url or settings.resolved_database_url)
    try:
        with session_factory(engine).begin() as session:
            if not write_seed_trusted(
                session, settings.model_name, settings.trusted, public=public
            ):
                return False
            session.flush()
            data = require_trusted(session, settings.model_name)
            reference = ReferenceStats.from_examples(data.x_train.astype(np.float64))
            insert_ignoring_duplicates(
                session,
                ReferenceStatsRow,
                [
                    {
                        "model_name": settings.model_name,
                        "stats": reference.to_dict(),
                        "example_count": len(data.x_train),
                    }
                ],
            )
        return True
    finally:
        engine.dispose()


def write_trusted_set(
    database_url: str,
    model_name: str,
    schema: Any,
    train: tuple[np.ndarray, list[str]],
    holdout: tuple[np.ndarray, list[str]],
    *,
    public: bool = True,
) -> None:
    """Write `train` and `holdout` (raw vectors of `schema`, label names) as the trusted
    set of `model_name`, without reference statistics (readers compute them then)."""
    from flywheel.store import (
        Split,
        TrustedInfo,
        make_engine,
        session_factory,
        write_trusted_info,
        write_trusted_rows,
    )

    names = list(train[1]) + list(holdout[1])
    engine = make_engine(database_url)
    try:
        with session_factory(engine).begin() as session:
            write_trusted_info(
                session,
                TrustedInfo(
                    model_name=model_name,
                    fingerprint="0" * 64,
                    schema=schema,
                    public=public,
                    rows_train=len(train[1]),
                    rows_holdout=len(holdout[1]),
                    split_rule="test rows",
                    label_counts={n: names.count(n) for n in schema.labels},
                    source="tests",
                ),
            )
            session.flush()
            write_trusted_rows(session, model_name, Split.TRAIN, 0, *train)
            write_trusted_rows(session, model_name, Split.HOLDOUT, 0, *holdout)
    finally:
        engine.dispose()
