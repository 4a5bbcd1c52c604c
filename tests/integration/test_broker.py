"""The embedded broker: a real Kafka-protocol server that starts, serves and stops cleanly."""

from __future__ import annotations

import contextlib
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


def test_cli_topics_creates_the_topics_on_the_configured_cluster(tmp_path, broker):
    """`flywheel topics` makes every topic of the settings on FLYWHEEL_KAFKA_BOOTSTRAP (with
    the data topics' retention: Tansu accepts the configs but does not echo them, so the
    values sent are checked in tests/unit/test_topic_retention.py); `--alter` then succeeds
    on the topics that exist, and without a bootstrap it refuses and says why."""
    suffix = os.urandom(4).hex()
    names = {
        f"FLYWHEEL_TOPIC_{kind.upper()}": f"{kind}-{suffix}"
        for kind in ("predictions", "corrections", "model_events", "deadletter", "scores")
    }
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home"), **names}
    env["FLYWHEEL_KAFKA_BOOTSTRAP"] = broker.bootstrap
    first = subprocess.run(
        [FLYWHEEL, "topics"], env=env, capture_output=True, text=True, timeout=deadline(60)
    )
    assert first.returncode == 0, first.stderr
    lines = dict(line.split("\t", 1) for line in first.stdout.splitlines())
    assert set(lines) == set(names.values())
    assert lines[f"predictions-{suffix}"].startswith("created\tretention.ms=")
    assert lines[f"deadletter-{suffix}"] == "created\tretention.ms=broker default"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert set(names.values()) <= set(admin.list_topics())
    finally:
        admin.close()
    again = subprocess.run(
        [FLYWHEEL, "topics", "--alter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline(60),
    )
    assert again.returncode == 0, again.stderr
    assert all(
        v.startswith("altered")
        for v in dict(line.split("\t", 1) for line in again.stdout.splitlines()).values()
    )
    env.pop("FLYWHEEL_KAFKA_BOOTSTRAP")
    none = subprocess.run(
        [FLYWHEEL, "topics"], env=env, capture_output=True, text=True, timeout=deadline(60)
    )
    assert none.returncode == 2 and "FLYWHEEL_KAFKA_BOOTSTRAP is not set" in none.stderr


def test_a_sigkilled_parent_takes_its_tansu_with_it(tmp_path):
    """A SIGKILL runs no handler: without the parent-death signal (flywheel.lifetime) the
    broker, in a session of its own, kept running and holding its port."""
    code = (
        "import sys, time\n"
        "from flywheel.broker import EmbeddedBroker\n"
        "b = EmbeddedBroker().start()\n"
        "print(b.port, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout is not None
        port = int(parent.stdout.readline())
        assert tansu_pids(port), "the broker did not start"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(deadline(10))
        end = time.monotonic() + deadline(10)
        while tansu_pids(port) and time.monotonic() < end:
            time.sleep(0.1)
        assert tansu_pids(port) == [], "the broker outlived its SIGKILLed parent"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
