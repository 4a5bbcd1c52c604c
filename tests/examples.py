"""Labelled corrections written straight into a test's store, as the feedback worker
would leave them, and the environment a `flywheel learn` child process needs.

The learner tests (store, lease, privacy, gate) each seeded their store with the same
loop over `drift_concept(7)`; it lives here once, with the one thing they vary: which
source (the privacy unit when no subject is given) each row comes from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any


def add_drift_examples(
    url: str,
    n: int,
    start: int,
    *,
    split: str = "train",
    source: str | Callable[[int], str] | None = None,
) -> None:
    """`n` examples of the drift stream's concept 7 (rows drawn with seed `start`), ids
    `t:{start}..`; each from its own source `user-{start + i}` unless `source` names one
    source, or maps the row's index `i` in this call to its source."""
    from flywheel.store import Example, insert_ignoring_duplicates, make_engine, session_factory
    from flywheel.streams import drift_concept

    def source_of(i: int) -> str:
        if source is None:
            return f"user-{start + i}"
        return source if isinstance(source, str) else source(i)

    x, labels = drift_concept(7).sample(n, sample_seed=start)
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            insert_ignoring_duplicates(
                session,
                Example,
                [
                    {
                        "dedup_key": f"t:{start + i}",
                        "origin": "correction",
                        "features": row.tolist(),
                        "label": label,
                        "weight": 1.0,
                        "split": split,
                        "source": source_of(i),
                        "parent_prediction_id": f"p{start + i}",
                        "error_type": "confident",
                    }
                    for i, (row, label) in enumerate(zip(x, labels, strict=True))
                ],
            )
    finally:
        engine.dispose()


LEARNER_ENV = (
    "home",
    "kafka_bootstrap",
    "database_url",
    "topic_predictions",
    "topic_corrections",
    "topic_model_events",
    "topic_deadletter",
    "seed_examples",
    "learn_batch",
    "learn_cursor_grace_s",
    "gate_min_holdout",
    "learn_lease_s",
    "learn_lease_renew_s",
)


def learner_env(s: Any, names: Iterable[str] = LEARNER_ENV, **extra: str) -> dict[str, str]:
    """This process's environment without its FLYWHEEL_ variables, plus each of `names`
    from the settings `s` as FLYWHEEL_<NAME>, a 0.2 s learner poll, and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    for name in names:
        env[f"FLYWHEEL_{name.upper()}"] = str(getattr(s, name))
    env["FLYWHEEL_LEARN_POLL_S"] = "0.2"
    env.update(extra)
    return env
