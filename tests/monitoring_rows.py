"""Hand-made live traffic in a test's store, for the monitoring tests (store, CLI, /metrics).

Model `fraud`, trusted set: `amount` numeric ~ N(0, 1), `country` categorical (DE, FR), 1,000
training rows. Around `NOW` (window: the last 24 h):

* v1, the champion, answered 40 predictions (amount ~ N(0, 1), country DE/FR alternating,
  largest probability 0.8): 30 labelled with delays 100, 200, ..., 3000 s, 24 of them right
  (every fifth wrong); 5 unlabelled from 5 h ago (a label was due: missing) and 5 from 60 s
  ago (younger than the p90 delay, 2,700 s: pending);
* v2, a shadow, scored the first 20 of v1's labelled predictions (largest probability 0.9)
  and was right on 10: over-confident, its CBPE on the labelled is 0.9 against 0.5;
* v3 answered 300 predictions an hour ago, none labelled, with shifted inputs (amount + 3,
  country always DE) and largest probability 0.7: what CBPE and PSI are for;
* outside the window or of another model (must not count): a v1 outcome labelled 30 h ago,
  a prediction of model `other`.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np

from tests.trusted import write_trusted_set

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MODEL = "fraud"


def schema():
    from flywheel.features import Feature, FeatureSchema

    return FeatureSchema(
        label="y",
        labels=["a", "b"],
        features=[
            Feature(name="amount", kind="numeric"),
            Feature(name="country", kind="categorical", vocabulary=["DE", "FR"]),
        ],
    )


def _outcome(pid: str, version: str, answered: bool, correct: bool, conf: float, t, lab):
    from flywheel.store import Outcome

    p_true = conf if correct else 1 - conf
    return Outcome(
        prediction_id=pid,
        model_version=version,
        model_name=MODEL,
        answered=answered,
        label="a" if correct else "b",
        predicted="a",
        correct=correct,
        p_true=p_true,
        log_loss=-math.log(max(p_true, 1e-15)),
        confidence=conf,
        predicted_at=t,
        labelled_at=lab,
    )


def _prediction(pid: str, version: str, features, conf: float, t, model: str = MODEL):
    from flywheel.store import Prediction

    return Prediction(
        id=pid,
        model_name=model,
        model_version=version,
        features=[float(f) for f in features],
        probabilities={"a": conf, "b": round(1 - conf, 6)},
        label="a",
        created_at=t,
        latency_ms=1.0,
    )


def fill(database_url: str, now: datetime = NOW) -> None:
    """Write the trusted set and the traffic above into the migrated store."""
    from flywheel.store import Score, make_engine, session_factory

    rng = np.random.default_rng(7)
    x = np.column_stack([rng.normal(size=1000), rng.integers(1, 3, size=1000)]).astype(np.float32)
    write_trusted_set(database_url, MODEL, schema(), (x, ["a"] * 1000), (x[:10], ["a"] * 10))
    amounts = rng.normal(size=400)
    rows: list = []
    for i in range(40):
        pid = f"p1-{i}"
        if i < 30:
            t = now - timedelta(hours=10) + timedelta(minutes=i)
        elif i < 35:
            t = now - timedelta(hours=5)
        else:
            t = now - timedelta(seconds=60)
        rows.append(_prediction(pid, "1", [amounts[i], 1 + i % 2], 0.8, t))
        if i < 30:
            lab = t + timedelta(seconds=100 * (i + 1))
            rows.append(_outcome(pid, "1", True, i % 5 != 0, 0.8, t, lab))
        if i < 20:
            rows.append(
                Score(
                    prediction_id=pid,
                    model_version="2",
                    model_name=MODEL,
                    role="shadow",
                    probabilities={"a": 0.9, "b": 0.1},
                    label="a",
                    created_at=t,
                )
            )
            lab = t + timedelta(seconds=100 * (i + 1))
            rows.append(_outcome(pid, "2", False, i % 2 == 0, 0.9, t, lab))
    for i in range(300):
        t = now - timedelta(hours=1)
        rows.append(_prediction(f"p3-{i}", "3", [amounts[100 + i] + 3.0, 1], 0.7, t))
    old = now - timedelta(hours=31)
    rows.append(_prediction("p-old", "1", [0.0, 1], 0.8, old))
    rows.append(_outcome("p-old", "1", True, False, 0.8, old, old + timedelta(hours=1)))
    rows.append(_prediction("p-other", "1", [0.0, 1], 0.8, now - timedelta(hours=1), "other"))
    engine = make_engine(database_url)
    try:
        with session_factory(engine).begin() as session:
            session.add_all(rows)
    finally:
        engine.dispose()
