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
            if not write_seed_trusted(session, settings.model_name, settings.trusted, public=public):
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
