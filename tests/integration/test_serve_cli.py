"""`flywheel serve` as a real process: starts, serves, logs to Kafka, stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flywheel.broker import free_port
from tests.deadlines import deadline

from .conftest import consume
from .test_broker import tansu_pids

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")
ROW = [0.5] * 8


def start_serve(env: dict, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [FLYWHEEL, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    until = time.monotonic() + deadline(120)
    while time.monotonic() < until:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("serve did not become ready")


def cli_app_key(env: dict, name: str = "tests", scopes: str = "predict") -> dict[str, str]:
    """Migrate the home's store and create an app with the CLI; its key's headers."""
    for args in (["db", "upgrade"], ["apps", "create", name, "--scopes", scopes, "--json"]):
        done = subprocess.run(
            [FLYWHEEL, *args], env=env, capture_output=True, text=True, timeout=deadline(120)
        )
        assert done.returncode == 0, done.stderr
    key = json.loads(done.stdout)["key"]
    return {"Authorization": f"Bearer {key}"}


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=deadline(30))
    assert proc.returncode == 0, out
    return out


def test_serve_against_an_external_broker(settings, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(settings.home_dir),
        "FLYWHEEL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "FLYWHEEL_TOPIC_PREDICTIONS": settings.topic_predictions,
        "FLYWHEEL_TOPIC_CORRECTIONS": settings.topic_corrections,
        "FLYWHEEL_TOPIC_MODEL_EVENTS": settings.topic_model_events,
        "FLYWHEEL_TOPIC_DEADLETTER": settings.topic_deadletter,
        "FLYWHEEL_TOPIC_SCORES": settings.topic_scores,
        "FLYWHEEL_SEED_EXAMPLES": "1000",
        # the fixture's generous delivery timeout: exactly-once is asserted below
        "FLYWHEEL_KAFKA_TIMEOUT_S": str(settings.kafka_timeout_s),
    }
    headers = cli_app_key(env)
    proc = start_serve(env, port)
    try:
        # readiness reports the broker once connected, before any prediction (issue 29)
        deadline = time.monotonic() + 60
        while not httpx.get(f"http://127.0.0.1:{port}/readyz").json()["kafka_connected"]:
            assert time.monotonic() < deadline, "kafka_connected stayed false with no traffic"
            time.sleep(0.1)
        ids = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            for _ in range(10):
                r = client.post("/v1/predict", json={"instances": [ROW, ROW]})
                assert r.status_code == 200
                ids += [p["id"] for p in r.json()["predictions"]]
            assert client.post("/v1/predict", json={"instances": [[1.0]]}).status_code == 422
            assert client.get("/v1/model").json()["version"] == "1"
    finally:
        out = stop(proc)
    assert "Traceback" not in out
    records = consume(settings.kafka_bootstrap, settings.topic_predictions, len(ids))
    assert sorted(k.decode() for k, _ in records) == sorted(ids)


@pytest.mark.slow
def test_serve_with_embedded_broker_leaves_no_orphan(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_SEED_EXAMPLES": "1000"}
    headers = cli_app_key(env)
    proc = start_serve(env, port)
    try:
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/predict", json={"instances": [ROW]}, headers=headers
        )
        assert r.status_code == 200
        until = time.monotonic() + deadline(60)  # connected once the first batch is acknowledged
        while not httpx.get(f"http://127.0.0.1:{port}/readyz").json()["kafka_connected"]:
            assert time.monotonic() < until, "the embedded broker never acknowledged"
            time.sleep(0.1)
    finally:
        out = stop(proc)
    broker_line = [line for line in out.splitlines() if "embedded broker at" in line]
    assert broker_line, out
    broker_port = int(broker_line[0].rsplit(":", 1)[1])
    assert tansu_pids(broker_port) == []


def test_bad_configuration_is_one_clear_line(tmp_path):
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_MAX_BATCH": "-1"}
    r = subprocess.run(
        [FLYWHEEL, "serve"], env=env, capture_output=True, text=True, timeout=deadline(60)
    )
    assert r.returncode == 2
    assert r.stderr.startswith("error: invalid configuration: FLYWHEEL_MAX_BATCH")
    assert "Traceback" not in r.stderr
