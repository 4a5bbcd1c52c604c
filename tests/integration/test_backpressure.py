"""A bounded spool with the broker stopped: `flywheel serve` spools corrections until
FLYWHEEL_SPOOL_MAX_BYTES, /readyz turns 503 at the high-water mark first, then
corrections and predictions get 503 with Retry-After; with the broker back the spool
drains, /readyz is ready again, and every correction answered 202 is on the topic.

Real parts: the test broker (Tansu, stopped and started again) and the CLI process."""

from __future__ import annotations

import time

import httpx
import pytest

from flywheel.broker import EmbeddedBroker, free_port
from flywheel.events import CorrectionEvent
from flywheel.settings import Settings

from .conftest import consume
from .test_durable_ack import metric, serve_env, wait_spool_drained
from .test_serve_cli import ROW, start_serve, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]
MAX_BYTES = 1 << 16
PER_CALL = 10


def test_a_full_spool_answers_503_and_nothing_acknowledged_is_lost(settings: Settings, tmp_path):
    own = EmbeddedBroker(log_file=tmp_path / "broker.log")
    own.start(topics=settings.topics, partitions=settings.topic_partitions)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = serve_env(
        settings,
        own.bootstrap,
        FLYWHEEL_KAFKA_TIMEOUT_S="1",
        FLYWHEEL_DURABLE_WAIT_MS="300",
        FLYWHEEL_SPOOL_MAX_BYTES=str(MAX_BYTES),
        FLYWHEEL_SPOOL_HIGH_WATER="0.5",
        FLYWHEEL_SPOOL_FSYNC="false",
    )
    acked: list[str] = []
    try:
        proc = start_serve(env, port)
        try:
            with httpx.Client(base_url=base, timeout=60) as c:
                own.stop()
                not_ready_at: int | None = None
                for call in range(2000):
                    ids = [f"p{call}-{i}" for i in range(PER_CALL)]
                    body = {"corrections": [{"prediction_id": p, "label": "class_1"} for p in ids]}
                    r = c.post("/v1/corrections", json=body)
                    if r.status_code == 503:
                        break
                    assert r.status_code == 202, r.text
                    acked.extend(ids)
                    ready = c.get("/readyz")
                    if ready.status_code == 503 and not_ready_at is None:
                        not_ready_at = ready.json()["spool_bytes"]
                else:
                    raise AssertionError("the spool never filled")
                assert "spool" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
                assert not_ready_at is not None, "/readyz stayed ready up to the full spool"
                assert MAX_BYTES // 2 < not_ready_at < MAX_BYTES
                r = c.post("/v1/predict", json={"instances": [ROW]})
                assert r.status_code == 503 and "retry-after" in r.headers
                assert metric(base, 'flywheel_spool_full_refusals_total{kind="corrections"}') == 1
                assert metric(base, 'flywheel_spool_full_refusals_total{kind="predictions"}') == 1
                assert c.get("/readyz").status_code == 503

                own.start(topics=settings.topics, partitions=settings.topic_partitions)
                wait_spool_drained(base, timeout_s=120)
                deadline = time.monotonic() + 60
                while c.get("/readyz").status_code != 200:
                    assert time.monotonic() < deadline, "/readyz never became ready again"
                    time.sleep(0.2)
                r = c.post("/v1/predict", json={"instances": [ROW]})
                assert r.status_code == 200, r.text
        finally:
            stop(proc)
        records = consume(own.bootstrap, settings.topic_corrections, len(acked))
        events = [CorrectionEvent.model_validate_json(v) for _, v in records]
        # every acknowledged correction, no refused one (a resent record is a duplicate
        # by id, which the store skips)
        assert {e.prediction_id for e in events} == set(acked)
        assert len(acked) > 100
    finally:
        own.stop()
