"""A 202 means stored: `flywheel serve` killed with SIGKILL right after the last 202
arrives loses no acknowledged correction, with the broker up (Kafka acknowledged them)
and with it stopped (the spool holds them, fsynced; a restart replays them).

The contract checked is at-least-once with the store's dedup by id: every acknowledged
correction reaches the topic, no foreign one does, so each id is there once after dedup;
a duplicate record is allowed only where a send was retried (after a replay).
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from flywheel.broker import EmbeddedBroker, free_port
from flywheel.events import CorrectionEvent
from flywheel.settings import Settings
from tests.deadlines import deadline

from .conftest import consume
from .test_serve_cli import ROW, start_serve, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
CLIENTS, CALLS, PER_CALL = 8, 4, 3  # concurrent connections, calls each, corrections a call


def serve_env(settings: Settings, bootstrap: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return env | {
        "FLYWHEEL_HOME": str(settings.home_dir),
        "FLYWHEEL_KAFKA_BOOTSTRAP": bootstrap,
        "FLYWHEEL_TOPIC_PREDICTIONS": settings.topic_predictions,
        "FLYWHEEL_TOPIC_CORRECTIONS": settings.topic_corrections,
        "FLYWHEEL_TOPIC_MODEL_EVENTS": settings.topic_model_events,
        "FLYWHEEL_TOPIC_DEADLETTER": settings.topic_deadletter,
        "FLYWHEEL_TOPIC_SCORES": settings.topic_scores,
        "FLYWHEEL_SEED_EXAMPLES": "1000",
        "FLYWHEEL_SPOOL_RETRY_S": "0.2",
        "FLYWHEEL_AUTH": "off",  # keys are test_apps.py's concern: these are about the 202
        **extra,
    }


def predict(base: str, n: int) -> list[str]:
    r = httpx.post(f"{base}/v1/predict", json={"instances": [ROW] * n}, timeout=30)
    assert r.status_code == 200, r.text
    return [p["id"] for p in r.json()["predictions"]]


def correct_concurrently(base: str, ids: list[str]) -> list[str]:
    """`CLIENTS` connections post `CALLS` calls of `PER_CALL` corrections each, at once;
    the prediction ids of every correction answered 202 (each call all or none)."""
    acked: list[str] = []
    lock = threading.Lock()
    chunks = [ids[i : i + PER_CALL] for i in range(0, len(ids), PER_CALL)]

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            for chunk in chunks[k::CLIENTS]:
                body = {"corrections": [{"prediction_id": p, "label": "class_1"} for p in chunk]}
                r = c.post("/v1/corrections", json=body)
                assert r.status_code == 202, r.text
                with lock:
                    acked.extend(chunk)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for f in [pool.submit(client, k) for k in range(CLIENTS)]:
            f.result()
    return acked


def metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} missing")


def wait_spool_drained(base: str, timeout_s: float = 60.0) -> None:
    import time

    until = time.monotonic() + deadline(timeout_s)
    while metric(base, "flywheel_log_spooled_records") > 0:
        assert time.monotonic() < until, "the restarted service never replayed its spool"
        time.sleep(0.2)


def assert_acknowledged_once_by_id(records, acked: list[str], exact: bool) -> None:
    events = [CorrectionEvent.model_validate_json(v) for _, v in records]
    assert {e.prediction_id for e in events} == set(acked), "lost or foreign corrections"
    assert len({e.id for e in events}) == len(set(acked))  # one event id per correction
    if exact:
        assert sorted(e.prediction_id for e in events) == sorted(acked), "duplicates"


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=deadline(30))
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_right_after_the_202s_loses_nothing_kafka_acknowledged(settings: Settings):
    """Broker up: each 202 came after Kafka's acknowledgement, so the corrections are on
    the topic even though the process died a moment after answering."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # a long wait: every 202 here comes from Kafka's acknowledgement, never the fallback
    env = serve_env(
        settings,
        settings.kafka_bootstrap,
        FLYWHEEL_KAFKA_TIMEOUT_S="10",
        FLYWHEEL_DURABLE_WAIT_MS="30000",
        FLYWHEEL_PREDICTION_DURABILITY="durable",
    )
    proc = start_serve(env, port)
    try:
        predicted = predict(base, CLIENTS * CALLS * PER_CALL)
        acked = correct_concurrently(base, predicted)
    finally:
        kill(proc)  # at once: whatever was only in memory is gone
    assert len(acked) == len(predicted)
    # durable predictions: answered once on the topic, so there already
    on_topic = consume(settings.kafka_bootstrap, settings.topic_predictions, len(predicted))
    assert {k.decode() for k, _ in on_topic} == set(predicted)
    proc = start_serve(env, port)  # the restart replays whatever a failed send spooled
    try:
        wait_spool_drained(base)
        exact = metric(base, "flywheel_log_replayed_total") == 0
    finally:
        stop(proc)
    records = consume(settings.kafka_bootstrap, settings.topic_corrections, len(acked))
    assert_acknowledged_once_by_id(records, acked, exact)


def test_sigkill_with_the_broker_stopped_loses_nothing_the_spool_acknowledged(
    settings: Settings, tmp_path
):
    """Broker stopped: each 202 came once the corrections were fsynced into the spool
    (by the sender after its failed send, or by the request after FLYWHEEL_DURABLE_WAIT_MS);
    a restart with the broker back replays every one of them."""
    own = EmbeddedBroker(log_file=tmp_path / "broker.log")
    own.start(topics=settings.topics, partitions=settings.topic_partitions)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = serve_env(
        settings,
        own.bootstrap,
        FLYWHEEL_KAFKA_TIMEOUT_S="2",
        FLYWHEEL_DURABLE_WAIT_MS="300",
    )
    try:
        proc = start_serve(env, port)
        try:
            predicted = predict(base, CLIENTS * CALLS * PER_CALL)
            own.stop()  # a memory broker: what it held is gone, the test reads what follows
            acked = correct_concurrently(base, predicted)
        finally:
            kill(proc)
        assert len(acked) == len(predicted)
        own.start(topics=settings.topics, partitions=settings.topic_partitions)
        proc = start_serve(env, port)
        try:
            wait_spool_drained(base)
            assert metric(base, "flywheel_log_replayed_total") >= len(acked)
        finally:
            stop(proc)
        records = consume(own.bootstrap, settings.topic_corrections, len(acked))
        # replayed from the spool: a correction spooled by both its request and the
        # sender is there twice by record, once by id
        assert_acknowledged_once_by_id(records, acked, exact=False)
    finally:
        own.stop()
