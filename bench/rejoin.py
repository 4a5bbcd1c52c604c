"""Rejoin after a broker pause: how long a feedback worker's consumer needs to read again.

The broker (the embedded Tansu) is paused with SIGSTOP for `--pause` seconds, as a long GC
or a VM stall would, and resumed with SIGCONT; a record is produced at once, and the time
until the feedback worker's consumer (`flywheel.feedback.consumer`, librdkafka, in its
group) hands it out is the rejoin time. Each row is one session timeout
(FLYWHEEL_FEEDBACK_SESSION_TIMEOUT_MS) of the worker's own consumer settings
(`consumer_config`), measured in turn on the same broker: 10 s (the old default), 6 s (the
default: the lowest a stock Kafka broker accepts), 2 s (what a Tansu deployment can use).

    python -m bench rejoin --pause 25 --rounds 1
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
import uuid

import typer


def _measure(bootstrap: str, pid: int, pause_s: float, session_ms: int, config: dict) -> float:
    from confluent_kafka import Consumer
    from kafka import KafkaProducer

    from flywheel.broker import ensure_topics
    from flywheel.feedback.consumer import KafkaBatchConsumer, consumer_config
    from flywheel.settings import FeedbackSettings, KafkaSettings

    topic = f"rejoin-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, [topic], 3)
    feedback = FeedbackSettings.model_validate(
        {"feedback_group": f"g-{uuid.uuid4().hex[:8]}", "feedback_session_timeout_ms": session_ms}
    )
    kafka = KafkaSettings.model_validate({"kafka_bootstrap": bootstrap})
    settings = {**consumer_config(feedback, kafka, "bench-rejoin"), **config}
    consumer = KafkaBatchConsumer(
        feedback,
        kafka,
        [topic],
        client_id="bench-rejoin",
        on_revoked=lambda _p: None,
        on_assigned=lambda _p: None,
        client=Consumer(settings),
    )
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", retries=20)
    try:
        deadline = time.monotonic() + 60
        while not consumer.assignment():
            consumer.poll(100, 0.2)
            if time.monotonic() > deadline:
                raise RuntimeError("the consumer never joined")
        producer.send(topic, b"before").get(30)
        while not any(m.value() == b"before" for m in consumer.poll(100, 0.2)[0]):
            pass
        os.kill(pid, signal.SIGSTOP)
        try:
            end = time.monotonic() + pause_s
            while time.monotonic() < end:  # the worker keeps polling, as it would
                consumer.poll(100, 0.2)
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        producer.send(topic, b"after")
        while True:
            messages, _ = consumer.poll(100, 0.1)
            if any(m.value() == b"after" for m in messages):
                return time.monotonic() - resumed
            if time.monotonic() - resumed > 120:
                raise RuntimeError("no record read within 120 s of the broker's resumption")
    finally:
        producer.close(5)
        consumer.close()


def main(
    pause: float = typer.Option(25.0, help="Seconds the broker is stopped."),
    rounds: int = typer.Option(2, min=1, help="Pauses per configuration."),
    sessions: str = typer.Option("10000,6000,2000", help="Session timeouts (ms) to compare."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Seconds from SIGCONT to the first record read, per consumer configuration."""
    from flywheel.broker import EmbeddedBroker

    timeouts = [int(t) for t in sessions.split(",")]
    results: dict[str, list[float]] = {f"session {t} ms": [] for t in timeouts}
    with EmbeddedBroker() as broker:
        assert broker.pid is not None
        for _ in range(rounds):
            for t in timeouts:  # in turn: same broker, same load
                seconds = _measure(broker.bootstrap, broker.pid, pause, t, {})
                results[f"session {t} ms"].append(seconds)
    doc = {
        "pause_s": pause,
        "rejoin_s": {
            name: {"median": statistics.median(v), "all": [round(x, 2) for x in v]}
            for name, v in results.items()
        },
    }
    if as_json:
        typer.echo(json.dumps(doc))
        return
    for name, r in doc["rejoin_s"].items():
        typer.echo(f"{name}: median {r['median']:.1f} s {r['all']}")
