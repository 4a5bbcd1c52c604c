"""`flywheel status` against a real service, broker and store: what each part says, the
feedback group's lag per partition before and after it commits, and a replica that is
down named as a problem (exit 1)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from typer.testing import CliRunner

from flywheel.broker import free_port
from flywheel.cli import app, register_commands
from flywheel.client import Client
from flywheel.registry import Registry
from flywheel.service import GracefulServer, ServiceConfig, create_app
from flywheel.settings import Settings
from flywheel.store import upgrade
from tests.conftest import make_app_key
from tests.deadlines import deadline

pytestmark = pytest.mark.integration


@pytest.fixture()
def running(settings: Settings, monkeypatch) -> Iterator[tuple[str, Settings]]:
    """The service under uvicorn on the fixture's home, broker and topics; the environment
    a `flywheel status` in another shell would have."""
    upgrade(settings.resolved_database_url)
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    env = {
        "FLYWHEEL_HOME": str(settings.home),
        "FLYWHEEL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLYWHEEL_TOPIC_PREDICTIONS": settings.topic_predictions,
        "FLYWHEEL_TOPIC_CORRECTIONS": settings.topic_corrections,
        "FLYWHEEL_TOPIC_MODEL_EVENTS": settings.topic_model_events,
        "FLYWHEEL_TOPIC_DEADLETTER": settings.topic_deadletter,
        "FLYWHEEL_TOPIC_SCORES": settings.topic_scores,
        "FLYWHEEL_SEED_EXAMPLES": str(settings.seed_examples),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    server = GracefulServer(
        uvicorn.Config(
            create_app(ServiceConfig.of(settings)),
            host="127.0.0.1",
            port=free_port(),
            log_level="warning",
            workers=1,
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        with Client(url) as probe:
            probe.wait_ready(timeout_s=deadline(180))
        yield url, settings
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "uvicorn did not stop"


def status(*args: str) -> tuple[int, dict]:
    register_commands()
    result = CliRunner().invoke(app, ["status", *args, "--json"])
    assert result.stdout.strip(), (result.output, result.exception)
    return result.exit_code, json.loads(result.stdout)


def test_status_reports_every_part_and_the_feedback_lag(running):
    url, s = running
    key = make_app_key(s.resolved_database_url, scopes="predict").key  # the store is migrated
    with Client(url, api_key=key) as fw:
        ids = fw.predict([[0.1 * i] * 8 for i in range(6)]).ids
    until = time.monotonic() + deadline(60)
    while True:  # the prediction log sends off the request path
        code, doc = status("--service", url)
        ends = sum(
            p["end"] for p in doc["kafka"]["partitions"] if p["topic"] == s.topic_predictions
        )
        if ends >= len(ids) or time.monotonic() > until:
            break
        time.sleep(0.5)
    assert code == 0, doc["problems"]
    (svc,) = doc["services"]
    champion = Registry.of(s).champion_version()
    assert svc["ready"] and svc["model_version"] == champion == doc["registry"]["champion"]
    assert svc["kafka_connected"] is True and svc["spooled_records"] == 0
    assert doc["store"]["current"] and doc["store"]["revision"] == doc["store"]["head"]
    parts = doc["kafka"]["partitions"]
    assert {p["topic"] for p in parts} == {s.topic_predictions, s.topic_corrections, s.topic_scores}
    assert len(parts) == 3 * s.topic_partitions  # predictions, corrections, scores
    assert ends == len(ids)  # each prediction once (Tansu under-reports ends: read to them)
    assert all(p["committed"] is None and p["lag"] == p["end"] for p in parts)  # nobody read
    assert doc["kafka"]["lag_total"] == len(ids) and doc["caught_up"]

    code, doc = status("--service", url, "--max-lag", "0")
    assert code == 0 and doc["behind"] and not doc["caught_up"]  # behind is not a problem
    assert f"{len(ids)} records to read" in doc["behind"][0]

    _read_and_commit(s)
    code, doc = status("--service", url, "--max-lag", "0")
    assert code == 0 and doc["kafka"]["lag_total"] == 0 and doc["caught_up"], doc


def test_a_replica_that_is_down_is_a_problem(running):
    url, _ = running
    down = f"http://127.0.0.1:{free_port()}"
    code, doc = status("--service", url, "--service", down)
    assert code == 1
    assert [svc["ready"] for svc in doc["services"]] == [True, False]
    assert len(doc["problems"]) == 1 and doc["problems"][0].startswith(f"{down}: ConnectError")


def _read_and_commit(s: Settings) -> None:
    """What a feedback worker does to the offsets: read the topics in its group, commit."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        s.topic_predictions,
        s.topic_corrections,
        bootstrap_servers=s.kafka_bootstrap,
        group_id=s.feedback_group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        until, seen = time.monotonic() + deadline(60), 0
        while seen < 6 and time.monotonic() < until:
            seen += sum(len(b) for b in consumer.poll(timeout_ms=500).values())
        assert seen == 6
        consumer.commit()
    finally:
        consumer.close()
