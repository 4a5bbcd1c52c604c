"""The embedded broker: a real Kafka-protocol server that starts, serves and stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer

from flywheel.broker import EmbeddedBroker, free_port
from tests.deadlines import deadline

from .conftest import consume

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def tansu_pids(port: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            listen = f"127.0.0.1:{port}".encode()
            if any(b"tansu" in c for c in cmd[:1]) and listen in b" ".join(cmd):
                pids.append(int(entry.name))
    return pids


def test_embedded_broker_round_trip(tmp_path):
    with EmbeddedBroker(log_file=tmp_path / "b.log") as b:
        b_port = b.port
        from flywheel.broker import ensure_topics

        assert ensure_topics(b.bootstrap, ["a", "b"], 2) == ["a", "b"]
        assert ensure_topics(b.bootstrap, ["a", "b"], 2) == []
        producer = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all")
        for i in range(10):
            producer.send("a", key=str(i).encode(), value=b"v")
        producer.flush(10)
        producer.close()
        assert sorted(int(k) for k, _ in consume(b.bootstrap, "a", 10)) == list(range(10))
    assert tansu_pids(b_port) == []


def test_cli_broker_prints_address_creates_topics_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(tmp_path / "home"),
        "FLYWHEEL_TOPIC_PREDICTIONS": "p-topic",
    }
    proc = subprocess.Popen(
        [FLYWHEEL, "broker", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line == f"127.0.0.1:{port}", line or proc.stderr.read()
        admin = KafkaAdminClient(bootstrap_servers=line)
        assert {
            "p-topic",
            "flywheel.corrections",
            "flywheel.model-events",
            "flywheel.deadletter",
        } <= set(admin.list_topics())
        admin.close()
        assert len(tansu_pids(port)) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(deadline(15)) == 0
    until = time.monotonic() + deadline(5)
    while tansu_pids(port) and time.monotonic() < until:
        time.sleep(0.1)
    assert tansu_pids(port) == [], "the broker process outlived the CLI"


def test_cli_broker_reports_a_taken_port(tmp_path, broker):
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home")}
    r = subprocess.run(
        [FLYWHEEL, "broker", "--port", str(broker.port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline(60),
    )
    assert r.returncode == 1
    assert "error:" in r.stderr and f"port {broker.port} on 127.0.0.1 is taken" in r.stderr
