"""App identities end to end, on SQLite and PostgreSQL: `flywheel apps create` makes a key,
a real service (uvicorn, a socket) refuses missing, bad and wrong-scope keys and serves the
right one; one app inventing 40 sub-sources is held to one app's limits; and a feedback
worker with FLYWHEEL_AUTH=on dead-letters Kafka corrections without a valid signature."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import httpx
import orjson
import pytest
import torch

from flywheel.appkeys import KEY_ID_HEADER, SIGNATURE_HEADER, parse_key, sign, signing_key
from flywheel.broker import read_topic
from flywheel.client import KafkaCorrections
from flywheel.events import CorrectionEvent, DeadLetter, PredictionEvent, correction_id, utcnow
from flywheel.feedback.examples import ExampleBuilder
from flywheel.feedback.join import store_and_join
from flywheel.learner import ensure_champion
from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import Registry
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import FeedbackSettings, Settings
from flywheel.store import (
    Example,
    insert_ignoring_duplicates,
    make_engine,
    session_factory,
    upgrade,
)
from tests.deadlines import deadline
from tests.serving import uvicorn_serving
from tests.trusted import write_synthetic_trusted

from .conftest import consume
from .test_feedback_worker import Traffic, joined, start, wait_for

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(url)
    return url


def cli(settings: Settings, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(settings.home_dir), "FLYWHEEL_DATABASE_URL": url}
    return subprocess.run(
        [FLYWHEEL, "apps", *args], env=env, capture_output=True, text=True, timeout=deadline(120)
    )


def cli_key(settings: Settings, url: str, name: str, scopes: str) -> dict[str, str]:
    done = cli(settings, url, "create", name, "--scopes", scopes, "--json")
    assert done.returncode == 0, done.stderr
    return {"Authorization": f"Bearer {json.loads(done.stdout)['key']}"}


@pytest.fixture()
def served(settings: Settings, db_url: str) -> Iterator[tuple[str, Settings]]:
    """The app under uvicorn on a real socket, its store at `db_url`, logging to Kafka."""
    s = settings.model_copy(update={"database_url": db_url})
    torch.manual_seed(0)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    with uvicorn_serving(create_app(ServiceConfig.of(s), holder=holder), "test-apps") as url:
        yield url, s


def test_the_cli_makes_keys_the_service_checks_by_scope(served, db_url):
    url, s = served
    shop = cli_key(s, db_url, "shop", "predict,correct")
    reader = cli_key(s, db_url, "reader", "predict")
    again = cli(s, db_url, "create", "shop", "--scopes", "predict")
    assert again.returncode == 1 and "exists" in again.stderr
    listed = json.loads(cli(s, db_url, "list", "--json").stdout)
    assert [(a["name"], a["scopes"]) for a in listed] == [
        ("reader", ["predict"]),
        ("shop", ["predict", "correct"]),
    ]
    predict = {"instances": [[1.0, 2.0, 3.0]]}
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.post("/v1/predict", json=predict).status_code == 401
        bad = {"Authorization": "Bearer fw_0123456789abcdef_" + "A" * 43}
        r = http.post("/v1/predict", json=predict, headers=bad)
        assert r.status_code == 401 and "unknown or wrong key" in r.json()["detail"]
        r = http.post("/v1/predict", json=predict, headers=shop)
        assert r.status_code == 200
        pid = r.json()["predictions"][0]["id"]
        body = {"corrections": [{"prediction_id": pid, "label": "dog"}]}
        r = http.post("/v1/corrections", json=body, headers=reader)
        assert r.status_code == 403 and "'correct' scope" in r.json()["detail"]
        assert http.post("/v1/corrections", json=body, headers=shop).status_code == 202
        # a rotation: both keys work during the grace; a revocation ends them all
        rotated = cli(s, db_url, "rotate", "shop", "--grace", "1h", "--json")
        assert rotated.returncode == 0, rotated.stderr
        new = {"Authorization": f"Bearer {json.loads(rotated.stdout)['key']}"}
        assert http.post("/v1/predict", json=predict, headers=new).status_code == 200
        assert http.post("/v1/predict", json=predict, headers=shop).status_code == 200
    last = json.loads(cli(s, db_url, "list", "--json").stdout)
    shop_keys = next(a for a in last if a["name"] == "shop")["keys"]
    assert len(shop_keys) == 2 and shop_keys[0]["expires_at"] is not None
    records = consume(s.kafka_bootstrap, s.topic_corrections, 1)
    assert CorrectionEvent.model_validate_json(records[0][1]).source == "shop"


def test_forty_made_up_sub_sources_are_held_to_one_apps_limits(served, db_url):
    """One prediction corrected under 40 names is one correction; 40 sub-sources' worth of
    counterexamples spend one app's budget, and none of another app's."""
    url, s = served
    shop = cli_key(s, db_url, "shop", "predict,correct")
    with httpx.Client(base_url=url, timeout=10, headers=shop) as http:
        r = http.post("/v1/predict", json={"instances": [[1.0, 2.0, 3.0]]})
        prediction = r.json()["predictions"][0]
        names = [f"user-{i}" for i in range(40)]
        body = {
            "corrections": [
                {"prediction_id": prediction["id"], "label": "dog", "source": n} for n in names
            ]
        }
        assert http.post("/v1/corrections", json=body).status_code == 202
        r = http.post(
            "/v1/corrections",
            json={
                "corrections": [
                    {"prediction_id": prediction["id"], "label": "dog", "source": "bank/x"}
                ]
            },
        )
        assert r.status_code == 403
    events = [
        CorrectionEvent.model_validate_json(v)
        for _, v in consume(s.kafka_bootstrap, s.topic_corrections, 40)
    ]
    assert len(events) == 40 and {e.source for e in events} == {f"shop/{n}" for n in names}
    assert {e.id for e in events} == {correction_id(prediction["id"], "dog", "shop")}
    logged = [
        PredictionEvent.model_validate_json(v)
        for _, v in consume(s.kafka_bootstrap, s.topic_predictions, 1)
    ]
    engine = make_engine(db_url)
    try:
        with session_factory(engine).begin() as session:
            batch = store_and_join(session, logged, events, datetime.now(UTC))
            assert batch.new_corrections == 1 and len(batch.pairs) == 1
        # the counterexample budget: 40 sub-sources x 3 stored, one app's 120
        now = utcnow()
        rows = [
            {
                "dedup_key": f"{n}-{k}",
                "origin": "counterexample",
                "error_type": "confident",
                "parent_prediction_id": prediction["id"],
                "features": [0.5, 1.5, 2.5],
                "label": "dog",
                "weight": 0.5,
                "split": "train",
                "source": f"shop/{n}",
                "created_at": now,
            }
            for n in names
            for k in range(3)
        ]
        with session_factory(engine)() as session:
            assert insert_ignoring_duplicates(session, Example, rows) == 120
            session.commit()
            stand_in = SimpleNamespace(
                feedback=FeedbackSettings(counterexample_budget=200, counterexample_window_s=3600)
            )
            left = ExampleBuilder.budget_left(stand_in, session, {"shop", "bank"}, now)
            session.rollback()
    finally:
        engine.dispose()
    assert left == {"shop": 80, "bank": 200}


@pytest.fixture()
def signed_settings(settings: Settings, db_url: str) -> Settings:
    """A feedback worker's settings with FLYWHEEL_AUTH=on (the default) on `db_url`."""
    s = settings.model_copy(
        update={
            "database_url": db_url,
            "feedback_group": f"fb-{uuid.uuid4().hex[:6]}",
            "feedback_session_timeout_ms": 6000,
        }
    )
    assert s.access.auth == "on"
    ensure_champion(s.trusted, Registry.of(s))
    write_synthetic_trusted(s)
    return s


def test_kafka_corrections_without_a_valid_signature_are_dead_lettered(signed_settings):
    s = signed_settings
    key = cli_key(s, s.resolved_database_url, "shop", "correct")["Authorization"][7:]
    traffic = Traffic(s)
    good = traffic.predictions(4)
    bad_ones = traffic.predictions(3)

    def event(pid: str, label: str, source: str) -> bytes:
        return CorrectionEvent(
            id=correction_id(pid, label, source),
            prediction_id=pid,
            label=label,
            source=source,
            timestamp=utcnow(),
        ).to_json()

    (p1, t1), (p2, t2), (p3, t3) = bad_ones
    key_id, _ = parse_key(key)
    forged = event(p2.id, t2, "shop")
    foreign = event(p3.id, t3, "bank/eu")
    worker, stop, thread = start(s)
    try:
        traffic.send_predictions(good + bad_ones)
        traffic.send_raw(s.topic_corrections, p1.id.encode(), event(p1.id, t1, "shop"))
        traffic.producer.send(
            s.topic_corrections,
            key=p2.id.encode(),
            value=forged,
            headers=[(KEY_ID_HEADER, key_id.encode()), (SIGNATURE_HEADER, b"v1=" + b"0" * 64)],
        )
        traffic.producer.send(
            s.topic_corrections,
            key=p3.id.encode(),
            value=foreign,
            headers=[
                (KEY_ID_HEADER, key_id.encode()),
                (SIGNATURE_HEADER, sign(foreign, signing_key(key)).encode()),
            ],
        )
        traffic.producer.flush()
        with KafkaCorrections(
            s.kafka_bootstrap, s.topic_corrections, api_key=key, app="shop"
        ) as kafka:
            assert kafka.send([(e.id, truth, "eu") for e, truth in good]) == 4
        wait_for(lambda: worker.stats.dead_letters == 3, what="three dead letters")
        wait_for(lambda: joined(s) == 4, what="the signed corrections joined")
    finally:
        stop.set()
        thread.join(30)
    letters = [
        DeadLetter.model_validate_json(r.value)
        for r in read_topic(s.kafka_bootstrap, s.topic_deadletter, at_least=3)
    ]
    reasons = {d.key: d.reason for d in letters}
    assert "unsigned correction" in reasons[p1.id]
    assert "bad signature" in reasons[p2.id]
    assert "not in the namespace of app 'shop'" in reasons[p3.id]
    assert all(orjson.loads(d.value)["prediction_id"] == d.key for d in letters)
