"""A correction's data subject end to end, on SQLite and PostgreSQL: a real service (uvicorn,
a socket) logging to the real broker, a real feedback worker writing the store. The raw
subject id reaches neither the topic nor any stored row; corrections about one subject
sent by two apps become one privacy unit (one budget); a correction without a subject is
its prediction's unit, and its counterexamples share it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
import torch
from pydantic import SecretStr

from flywheel.events import CorrectionEvent
from flywheel.learner.private_step import PrivateStep
from flywheel.registry import Registry
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings
from flywheel.store import ExampleReader, make_engine
from flywheel.subjects import subject_key
from tests.integration.worker_settings import worker_settings
from tests.serving import uvicorn_serving

from .conftest import consume
from .test_feedback_worker import Traffic, joined, start, wait_for

pytestmark = pytest.mark.integration
KEY = "platform-secret-" + "k" * 32
RAW = "alice@example.com"


@pytest.fixture(params=["sqlite", "postgresql"])
def subject_settings(request, settings: Settings) -> Settings:
    return worker_settings(
        request,
        settings,
        auth="off",  # sources as sent: two apps without making keys
        subject_key=SecretStr(KEY),  # model_copy does not validate: as settings hold it
    )


@pytest.fixture()
def served(subject_settings: Settings) -> Iterator[tuple[str, Settings]]:
    s = subject_settings
    loaded = Registry.of(s).load(Registry.of(s).champion_version())
    holder = ModelHolder()
    holder.swap(ServedModel.prepare(s.model_name, loaded.version, loaded.spec, loaded.module))
    app = create_app(ServiceConfig.of(s), holder=holder)
    with uvicorn_serving(app, "test-subjects") as url:
        yield url, s


def _stored_text(url: str) -> str:
    """Every row of every table, as text: where a raw id would show if it were stored."""
    engine = make_engine(url)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(
                repr(row) for table in meta.sorted_tables for row in conn.execute(table.select())
            )
    finally:
        engine.dispose()


def test_a_subject_is_hashed_at_intake_and_is_one_unit_across_apps(served):
    url, s = served
    traffic = Traffic(s)
    events = traffic.predictions(4, drifted=True, seed=7)  # mostly wrong: counterexamples
    traffic.send_predictions(events)
    (p1, t1), (p2, t2), (p3, t3), (p4, t4) = events
    hashed = subject_key(RAW, KEY)
    with httpx.Client(base_url=url, timeout=30) as http:
        for body in (
            [{"prediction_id": p1.id, "label": t1, "source": "shop", "subject": RAW}],
            [{"prediction_id": p2.id, "label": t2, "source": "bank", "subject": RAW}],
            [{"prediction_id": p3.id, "label": t3, "source": "shop", "subject": "bob"}],
            [{"prediction_id": p4.id, "label": t4, "source": "shop"}],
        ):
            r = http.post("/v1/corrections", json={"corrections": body})
            assert r.status_code == 202, r.text
        r = http.post(
            "/v1/corrections",
            json={"corrections": [{"prediction_id": p4.id, "label": t4, "subject": " "}]},
        )
        assert r.status_code == 422  # blank after stripping: refused, not an empty subject
    records = consume(s.kafka_bootstrap, s.topic_corrections, 4)
    assert not any(RAW.encode() in value or b"bob" in value for _, value in records)
    # the topic is at-least-once (a send that outlasts the durable wait is spooled and
    # replayed under load): four corrections, by id, however many records carry them
    events = {e.id: e for e in (CorrectionEvent.model_validate_json(v) for _, v in records)}
    assert len(events) == 4
    by_prediction = {e.prediction_id: e for e in events.values()}
    assert by_prediction[p1.id].subject == by_prediction[p2.id].subject == hashed
    assert by_prediction[p4.id].subject is None

    worker, stop, thread = start(s)
    try:
        wait_for(lambda: joined(s) == 4, 120, "four joined corrections")
        wait_for(
            lambda: (
                len(ExampleReader(make_engine(s.resolved_database_url)).unread(0, [], 1000)) >= 4
            ),
            60,
            "the examples",
        )
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()

    stored = _stored_text(s.resolved_database_url)
    assert RAW not in stored and "'bob'" not in stored
    assert hashed in stored  # the keyed hash is what the store keeps
    engine = make_engine(s.resolved_database_url)
    try:
        rows = ExampleReader(engine).unread(0, [], 1000)
        units = {r.parent_prediction_id: set() for r in rows}
        for r in rows:
            units[r.parent_prediction_id].add(r.contributor)
        alice = f"subject:{hashed}"
        assert units[p1.id] == units[p2.id] == {alice}  # two apps, one subject, one unit
        assert units[p3.id] == {f"subject:{subject_key('bob', KEY)}"}
        assert units[p4.id] == {f"prediction:{p4.id}"}  # counterexamples included
        assert any(r.origin == "counterexample" for r in rows)
        # the DP planner sees one unit for Alice: one budget, one ε in the ledger
        step = PrivateStep(s.privacy, 4, engine, "m:online")
        outcome = step.plan(rows, 1, torch.nn.Sequential(torch.nn.Linear(len(p1.features), 2)))
        assert outcome is not None and outcome.plan is not None
        assert set(outcome.plan.allowed) == {r.contributor for r in rows}
        mine = [r for r in rows if r.contributor == alice]
        assert outcome.sources[alice] == min(len(mine), s.privacy_max_per_source)
        spends = {sp.source: sp for sp in step.ledger.sources("m:online")}
        assert spends[alice].updates == 1 and RAW not in "".join(spends)
    finally:
        engine.dispose()
