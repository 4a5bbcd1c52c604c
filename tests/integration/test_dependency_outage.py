"""`flywheel feedback` waits out a PostgreSQL outage (issue 27): the process keeps running,
says not-ready on /readyz and `flywheel_dependency_up{dependency="store"} 0` meanwhile,
and once the database is back stores every record sent during the outage exactly once.
Real parts: its own PostgreSQL (killed and restarted), the test broker, the CLI process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from flywheel.broker import free_port
from flywheel.learner import ensure_champion
from flywheel.registry import Registry
from flywheel.store import Correction, Prediction, make_engine, upgrade
from tests.deadlines import deadline
from tests.trusted import write_synthetic_trusted

from .test_feedback_worker import Traffic

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
OUTAGE_S = 9.0  # longer than the old 1.5 s retry window, by 6x


def readyz(port: int) -> tuple[int, dict]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def metric(port: int, sample: str) -> str | None:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith(sample)]
    return lines[0].rsplit(" ", 1)[1] if lines else None


def counts(url: str) -> tuple[list[str], list[tuple[str, str]]]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            predictions = list(conn.scalars(select(Prediction.id)))
            corrections = [tuple(r) for r in conn.execute(select(Correction.id, Correction.status))]
    finally:
        engine.dispose()
    return predictions, corrections


def joined(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.scalar(
                select(func.count()).select_from(Correction).where(Correction.status == "joined")
            )
    finally:
        engine.dispose()


def wait_until(condition, proc: subprocess.Popen, timeout_s: float, what: str, log: Path) -> None:
    until = time.monotonic() + deadline(timeout_s)
    while not condition():
        assert proc.poll() is None, (
            f"the worker exited while waiting for {what}: {log.read_text()[-3000:]}"
        )
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.1)


def _worker_env(settings, url: str, group: str, **extra: str) -> dict[str, str]:
    """`flywheel feedback`'s environment: this test's home, broker, topics and store, a
    group of its own, back within 2 s of the database (`FLYWHEEL_RETRY_MAX_S`), `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return env | {
        "FLYWHEEL_HOME": str(settings.home_dir),
        "FLYWHEEL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLYWHEEL_DATABASE_URL": url,
        "FLYWHEEL_FEEDBACK_GROUP": f"{group}-{uuid.uuid4().hex[:6]}",
        "FLYWHEEL_TOPIC_PREDICTIONS": settings.topic_predictions,
        "FLYWHEEL_TOPIC_CORRECTIONS": settings.topic_corrections,
        "FLYWHEEL_TOPIC_MODEL_EVENTS": settings.topic_model_events,
        "FLYWHEEL_TOPIC_DEADLETTER": settings.topic_deadletter,
        "FLYWHEEL_TOPIC_SCORES": settings.topic_scores,
        "FLYWHEEL_SEED_EXAMPLES": str(settings.seed_examples),
        "FLYWHEEL_FEEDBACK_SESSION_TIMEOUT_MS": "6000",
        "FLYWHEEL_FEEDBACK_MAX_RECORDS": "50",
        "FLYWHEEL_RETRY_MAX_S": "2",
        **extra,
    }


def test_feedback_worker_waits_out_a_postgresql_outage(settings, own_postgres, tmp_path):
    url = own_postgres.url
    upgrade(url)
    write_synthetic_trusted(settings, database_url=url)
    ensure_champion(settings.trusted, Registry.of(settings))
    traffic = Traffic(settings)
    before, during = traffic.predictions(150, seed=1), traffic.predictions(150, seed=2)
    port = free_port()
    env = _worker_env(
        settings,
        url,
        "outage",
        FLYWHEEL_FEEDBACK_METRICS_PORT=str(port),
        FLYWHEEL_AUTH="off",  # Traffic sends unsigned corrections
    )
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [FLYWHEEL, "feedback"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        traffic.send_predictions(before)
        sent_corrections = traffic.send_corrections(before)
        wait_until(lambda: joined(url) == 150, proc, 120, "the first 150 joins", log)
        wait_until(lambda: readyz(port)[0] == 200, proc, 30, "ready", log)
        assert metric(port, 'flywheel_dependency_up{dependency="store"}') == "1.0"

        own_postgres.kill()
        killed = time.monotonic()
        traffic.send_predictions(during)  # the worker polls these and cannot store them
        sent_corrections += traffic.send_corrections(during)
        wait_until(
            lambda: readyz(port)[0] == 503, proc, 30, "not ready while the store is down", log
        )
        code, body = readyz(port)
        assert code == 503 and body["dependencies"]["store"] is False, body
        assert "store" in body["down"]
        assert metric(port, 'flywheel_dependency_up{dependency="store"}') == "0.0"
        while time.monotonic() - killed < OUTAGE_S:
            assert proc.poll() is None, f"the worker exited: {log.read_text()[-3000:]}"
            assert readyz(port)[0] == 503
            time.sleep(0.5)

        own_postgres.start()
        wait_until(lambda: joined(url) == 300, proc, 120, "every join after the outage", log)
        wait_until(lambda: readyz(port)[0] == 200, proc, 30, "ready again", log)
        assert metric(port, 'flywheel_dependency_up{dependency="store"}') == "1.0"
        time.sleep(1.0)  # a replayed batch, were one stored twice, would surface now
        predictions, corrections = counts(url)
        sent = sorted(e.id for e, _ in before + during)
        assert sorted(predictions) == sent  # each prediction exactly once
        assert sorted(c for c, _ in corrections) == sorted(c.id for c in sent_corrections)
        assert {s for _, s in corrections} == {"joined"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(deadline(60))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(deadline(10))
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "store unavailable" in text


class _RegistryDownFor:
    """The real registry behind a connection that refuses its first `n` calls (an MLflow
    server still starting): the fault is injected, the registry and its models are real."""

    def __init__(self, registry: Registry, n: int) -> None:
        self._registry, self.left = registry, n

    def __getattr__(self, name: str):
        attr = getattr(self._registry, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if self.left > 0:
                self.left -= 1
                raise ConnectionRefusedError(111, "Connection refused (MLflow starting)")
            return attr(*args, **kwargs)

        return call


def test_service_starts_not_ready_while_the_registry_is_down_then_serves(
    settings, list_event_log, service_key
):
    from fastapi.testclient import TestClient

    from flywheel.service import ServiceConfig, create_app

    ensure_champion(settings.trusted, Registry.of(settings))
    flaky = _RegistryDownFor(Registry.of(settings), 5)
    config = ServiceConfig.of(settings.model_copy(update={"retry_max_s": 0.5}))
    app = create_app(config, registry=flaky, event_log=list_event_log())  # type: ignore[arg-type]
    with TestClient(app) as client:  # start-up did not fail on the refused first load
        first = client.get("/readyz")
        until = time.monotonic() + deadline(60)
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < until, "never became ready"
            time.sleep(0.05)
        metrics = client.get("/metrics").text
        ready = client.get("/readyz").json()
        r = client.post("/v1/predict", json={"instances": [[0.1] * 8]}, headers=service_key.headers)
    assert first.status_code == 503
    assert first.json()["dependencies"]["registry"] is False
    assert "Connection refused" in first.json()["down"]["registry"]
    assert ready["dependencies"]["registry"] is True and ready["model_version"] == "1"
    assert 'flywheel_dependency_up{dependency="registry"} 1.0' in metrics
    assert r.status_code == 200, r.text
    assert flaky.left == 0


def _send_signed_corrections(traffic: Traffic, events, key: str, app: str) -> list[str]:
    """Corrections produced straight to Kafka, signed with app `app`'s `key` (as the
    service signs the ones it accepts): the worker checks each signature against the
    key's row in the store."""
    from flywheel.appkeys import KEY_ID_HEADER, SIGNATURE_HEADER, parse_key, sign, signing_key
    from flywheel.events import CorrectionEvent, correction_id, utcnow

    key_id, secret = parse_key(key)[0].encode(), signing_key(key)
    ids = []
    for e, truth in events:
        c = CorrectionEvent(
            id=correction_id(e.id, truth, app),
            prediction_id=e.id,
            label=truth,
            source=app,
            timestamp=utcnow(),
        )
        value = c.to_json()
        headers = [(KEY_ID_HEADER, key_id), (SIGNATURE_HEADER, sign(value, secret).encode())]
        traffic.producer.send(
            traffic.s.topic_corrections, key=e.id.encode(), value=value, headers=headers
        )
        ids.append(c.id)
    traffic.producer.flush()
    return ids


def test_signed_corrections_wait_out_a_postgresql_outage_too(settings, own_postgres, tmp_path):
    """Found by the fault suite (tests/faults): with app keys on, a signed correction whose
    key's cached row is older than FLYWHEEL_AUTH_CACHE_TTL_S needs the store to check its
    signature; during a PostgreSQL kill that read raised out of the worker, which exited
    ("error: database: connection failed"). Now the check waits the outage out."""
    from tests.conftest import make_app_key

    url = own_postgres.url
    upgrade(url)
    write_synthetic_trusted(settings, database_url=url)
    ensure_champion(settings.trusted, Registry.of(settings))
    app = make_app_key(url, name="shop", scopes="correct")
    traffic = Traffic(settings)
    before, during = traffic.predictions(100, seed=1), traffic.predictions(100, seed=2)
    env = _worker_env(
        settings,
        url,
        "signed-outage",
        FLYWHEEL_AUTH="on",
        FLYWHEEL_AUTH_CACHE_TTL_S="1",  # the key is read again during the outage
    )
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [FLYWHEEL, "feedback"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        traffic.send_predictions(before)
        sent = _send_signed_corrections(traffic, before, app.key, app.name)
        wait_until(lambda: joined(url) == 100, proc, 120, "the first 100 joins", log)
        own_postgres.kill()
        killed = time.monotonic()
        time.sleep(1.5)  # the key's cached row is now older than its TTL
        traffic.send_predictions(during)
        sent += _send_signed_corrections(traffic, during, app.key, app.name)
        while time.monotonic() - killed < OUTAGE_S:
            assert proc.poll() is None, f"the worker exited: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        own_postgres.start()
        wait_until(lambda: joined(url) == 200, proc, 120, "every join after the outage", log)
        _, corrections = counts(url)
        assert sorted(c for c, _ in corrections) == sorted(sent)
        assert {s for _, s in corrections} == {"joined"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "checking a correction's signature" in log.read_text()  # it said what it waited on
