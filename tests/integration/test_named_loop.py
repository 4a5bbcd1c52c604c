"""Bring your own problem, end to end: `flywheel init` on a CSV with named features, then
the real loop (Kafka-protocol broker, feedback worker, learner, service) on PostgreSQL and
SQLite, driven by `flywheel.client` with named rows.

The app predicts named rows, a new country ("BR", outside the vocabulary `init` learned,
so it falls in the unknown bucket) turns out to be all fraud, and the app sends the true
labels as corrections. The worker joins them to the logged predictions and writes
examples; the learner trains on those raw vectors, its candidate beats the champion on
the recent holdout corrections, is promoted, and the service swaps to it while named rows
keep working. Small settings keep it short (learn batch 20, gate on 5 holdout
corrections, DP off); every wait polls for its condition and ends when it holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from flywheel.cli import app, register_commands
from flywheel.client import Client
from flywheel.demo import demo_api_key, embedded_stack, running_loop
from flywheel.features import FeatureSchema
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import (
    Correction,
    Example,
    Origin,
    Prediction,
    make_engine,
    session_factory,
)
from tests.deadlines import deadline

from .conftest import consume

pytestmark = pytest.mark.integration
register_commands()

COUNTRIES = ["FR", "DE", "US", "JP"]
DEVICES = ["ios", "android", "web"]
WAIT_S = 180.0  # an upper bound only: every wait returns as soon as its condition holds


def truth(amount: float, country: str, device: str, mobile: bool) -> str:
    """Fraud: large amounts, or iOS in France; after `init`, everything from Brazil."""
    if country == "BR" or amount > 80 or (country == "FR" and device == "ios"):
        return "yes"
    return "no"


def rows(n: int, seed: int, countries: list[str]) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "amount": round(float(rng.normal(50, 20)), 2),
            "country": str(rng.choice(countries)),
            "device": str(rng.choice(DEVICES)),
            "mobile": bool(rng.random() < 0.5),
        }
        for _ in range(n)
    ]


def write_csv(path: Path, n: int = 800) -> Path:
    lines = ["amount,country,device,mobile,fraud"]
    for r in rows(n, 0, COUNTRIES):
        lines.append(
            f"{r['amount']},{r['country']},{r['device']},{str(r['mobile']).lower()},{truth(**r)}"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_until(what: str, check: Callable[[], object], timeout_s: float = WAIT_S) -> object:
    until = time.monotonic() + deadline(timeout_s)
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > until:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def test_named_predict_correct_update_and_hot_swap(tmp_path, settings, db_url):
    s: Settings = settings.model_copy(
        update={
            "database_url": db_url,
            "port": 0,
            "learn_batch": 20,
            "learn_poll_s": 0.2,
            "gate_min_holdout": 5,
            "gate_tolerance": 0.5,  # the new country may cost a little on the old data
            "holdout_fraction": 0.25,
            "privacy_enabled": False,
        }
    )
    data = write_csv(tmp_path / "transactions.csv")
    env = {
        "FLYWHEEL_HOME": str(s.home_dir),
        "FLYWHEEL_DATABASE_URL": db_url,
        "FLYWHEEL_MLFLOW_TRACKING_URI": s.resolved_mlflow_uri,
    }
    out = CliRunner().invoke(
        app, ["init", "--data", str(data), "--label", "fraud", "--public", "--json"], env=env
    )
    assert out.exit_code == 0, out.stderr
    registry = Registry.of(s)
    initial = registry.champion_version()
    assert initial is not None
    schema = registry.load(initial).spec.schema
    assert isinstance(schema, FeatureSchema)
    kinds = {f.name: f.kind for f in schema.inputs}
    assert kinds == {
        "amount": "numeric",
        "country": "categorical",
        "device": "categorical",
        "mobile": "boolean",
    }
    fingerprint = registry.info(initial).tags["schema_fingerprint"]
    assert fingerprint == schema.fingerprint()

    with (
        embedded_stack(s) as s,
        running_loop(s) as (worker, learner, url),
        Client(url, api_key=demo_api_key(s)) as fw,  # corrections signed by app `demo`
    ):
        fw.wait_ready(60)
        assert fw.model().version == initial
        # the app: named rows, half from the new country; the truth for every one
        asked = rows(240, 1, ["BR", *COUNTRIES[:2]])
        result = fw.predict(asked)
        assert len(result.predictions) == len(asked)
        assert {p.model.version for p in result.predictions} == {initial}
        ids = [p.id for p in result.predictions]
        accepted = fw.correct(
            [(p.id, truth(**r)) for p, r in zip(result.predictions, asked, strict=True)]
        )
        assert accepted == len(asked)

        # the hot swap: the learner promotes, the service serves the new version
        def swapped() -> str | None:
            version = fw.model().version
            return version if version != initial else None

        new = str(wait_until("a promoted version to be served", swapped))
        assert registry.champion_version() == new
        # the learner records its candidate once promote() returns, which also makes the
        # replaced champion the guard (FLYWHEEL_LIVE_GUARD): the service may swap first
        wait_until(
            "the learner to record its promotion",
            lambda: new in {c.version for c in learner.stats.history if c.promoted},
        )

        # named rows keep working after the swap, answered by the new version
        after = fw.predict(rows(50, 2, ["BR", *COUNTRIES]))
        assert {p.model.version for p in after.predictions} == {new}
        br = rows(50, 3, ["BR"])
        assert fw.predict(br).labels.count("yes") > len(br) // 2  # it learned the new country
        joined = worker.stats.joined

    # the new version carries the same schema in its spec, and says so in its tag
    assert registry.info(new).tags["schema_fingerprint"] == fingerprint
    new_schema = registry.load(new).spec.schema
    assert new_schema is not None and new_schema.fingerprint() == fingerprint
    assert new_schema == schema
    assert registry.info(new).tags["source"] == "online"

    # prediction events hold the raw vectors (and the named row as sent)
    width = len(schema.inputs)
    events = [json.loads(v) for _, v in consume(s.kafka_bootstrap, s.topic_predictions, len(ids))]
    by_id = {e["id"]: e for e in events}
    first = by_id[ids[0]]
    assert first["row"] == asked[0]
    assert first["features"] == pytest.approx(
        schema.encode_rows([asked[0]]).x[0].tolist(), abs=1e-4
    )
    assert all(len(by_id[i]["features"]) == width for i in ids)

    # the store: predictions with raw vectors, corrections joined, examples from them
    assert joined >= len(ids)
    engine = make_engine(s.resolved_database_url)
    try:
        with session_factory(engine)() as session:
            stored = dict(
                session.execute(
                    select(Prediction.id, Prediction.features).where(Prediction.id.in_(ids))
                ).all()
            )
            assert set(stored) == set(ids)
            assert stored[ids[0]] == pytest.approx(first["features"])
            statuses = dict(
                session.execute(
                    select(Correction.status, func.count())
                    .where(Correction.prediction_id.in_(ids))
                    .group_by(Correction.status)
                ).all()
            )
            examples = session.execute(
                select(Example.parent_prediction_id, Example.features, Example.split).where(
                    Example.parent_prediction_id.in_(ids),
                    Example.origin == Origin.CORRECTION.value,  # not the counterexamples
                )
            ).all()
    finally:
        engine.dispose()
    assert sum(statuses.values()) == len(ids) and "pending" not in statuses, statuses
    assert len(examples) == len(ids)
    assert {split for _, _, split in examples} == {"train", "holdout"}
    example_of = {pid: features for pid, features, _ in examples}
    assert example_of[ids[0]] == pytest.approx(first["features"])
