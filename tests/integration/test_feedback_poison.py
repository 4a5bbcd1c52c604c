"""No record stops the feedback worker (issue 26): records that once made `flywheel
feedback` exit -- a 5 MB value, 300 KB of invalid UTF-8, a valid prediction with a 5 MB
`model_version` -- and duplicates of stored ids with other content, mixed with valid
traffic, on the real broker and PostgreSQL. Each bad one is dead-lettered once, bounded,
with its reason; every valid record is stored once; the offsets are committed, so a
restarted member of the group reads none of them again."""

from __future__ import annotations

import hashlib
import uuid

import orjson
import pytest
from kafka import KafkaProducer
from sqlalchemy import func, select

from flywheel.broker import read_topic
from flywheel.events import CorrectionEvent, DeadLetter, PredictionEvent, utcnow
from flywheel.feedback.deadletter import MAX_LETTER_BYTES, VALUE_CAP
from flywheel.learner import ensure_champion
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import Correction, Prediction, make_engine, session_factory, upgrade
from tests.deadlines import deadline
from tests.integration.test_feedback_worker import Traffic, count, joined, start, wait_for
from tests.trusted import write_synthetic_trusted

pytestmark = pytest.mark.integration

BIG = 5_000_000  # Tansu takes records this large; kafka-python must be allowed to send them


@pytest.fixture()
def pg_settings(settings: Settings, pg_url: str) -> Settings:
    upgrade(pg_url)
    s = settings.model_copy(
        update={
            "database_url": pg_url,
            "feedback_group": f"fb-{uuid.uuid4().hex[:6]}",
            "feedback_session_timeout_ms": 6000,
            "feedback_max_records": 200,
            # unsigned records: what decoding does with them (signatures: test_apps.py)
            "auth": "off",
        }
    )
    ensure_champion(s.trusted, Registry.of(s))
    write_synthetic_trusted(s)
    return s


def stored_prediction(s: Settings, pid: str) -> tuple:
    engine = make_engine(s.resolved_database_url)
    try:
        with session_factory(engine)() as session:
            row = session.execute(
                select(Prediction.model_version, Prediction.features, Prediction.label).where(
                    Prediction.id == pid
                )
            ).one()
            return tuple(row)
    finally:
        engine.dispose()


def running(thread) -> bool:
    """True while the worker's thread runs; fails the test at once when it has stopped
    (as it did on a dead letter the producer refused)."""
    if not thread.is_alive():
        pytest.fail("the feedback worker stopped")
    return True


def test_no_record_stops_the_worker_and_each_is_dead_lettered_once(pg_settings):
    s = pg_settings
    traffic = Traffic(s)
    producer = KafkaProducer(
        bootstrap_servers=s.kafka_bootstrap, acks="all", max_request_size=2 * BIG
    )
    first, second = traffic.predictions(10, seed=1), traffic.predictions(10, seed=2)
    victim, _ = first[0]  # its id comes again, later, with other content
    resent, _ = first[1]  # and this one again as it was: a redelivery, skipped silently
    over_long = first[2][0].model_dump(mode="json") | {"id": "long-version"}
    over_long["model_version"] = "9" * BIG
    conflicting = victim.model_copy(update={"features": [0.0] * len(victim.features)})
    bad = {  # name -> (what the reason says, topic, key, value)
        "5 MB": ("not JSON", s.topic_predictions, b"big", b"#" * BIG),
        "invalid UTF-8": ("not JSON", s.topic_corrections, b"bad-utf8", b"\xff" * 300_000),
        "long version": (
            "schema: model_version: String should have at most 64 characters",
            s.topic_predictions,
            b"long-version",
            orjson.dumps(over_long),
        ),
        "conflict": (
            f"duplicate: prediction id {victim.id!r} is stored already with a different "
            "features; the first is kept",
            s.topic_predictions,
            victim.id.encode(),
            conflicting.to_json(),
        ),
    }

    worker, stop, thread = start(s, "poison-1")
    try:
        traffic.send_predictions(first)
        sent = traffic.send_corrections(first)
        wait_for(lambda: joined(s) == len(first), what="the first corrections joined")
        for _, topic, key, value in bad.values():  # after the victim is stored
            producer.send(topic, key=key, value=value)
        producer.send(s.topic_predictions, key=resent.id.encode(), value=resent.to_json())
        relabelled = CorrectionEvent(  # the id of a stored correction, another label
            id=sent[3].id,
            prediction_id=sent[3].prediction_id,
            label=next(lab for lab in traffic.labels if lab != sent[3].label),
            source=sent[3].source,
            timestamp=utcnow(),
        )
        producer.send(
            s.topic_corrections, key=relabelled.prediction_id.encode(), value=relabelled.to_json()
        )
        bad["relabelled"] = (
            f"duplicate: correction id {relabelled.id!r} is stored already with a different "
            "label; the first is kept",
            s.topic_corrections,
            relabelled.prediction_id.encode(),
            relabelled.to_json(),
        )
        producer.flush()
        traffic.send_predictions(second)
        traffic.send_corrections(second)
        wait_for(
            lambda: running(thread) and worker.stats.dead_letters >= len(bad) and joined(s) == 20,
            timeout_s=deadline(120),
            what="every bad record dead-lettered and every good one joined",
        )
    finally:
        stop.set()
        thread.join(60)
        producer.close()
    assert not thread.is_alive()
    assert worker.stats.dead_letters == len(bad)

    # every valid record stored exactly once, the first of each id kept
    assert count(s, select(func.count()).select_from(Prediction)) == 20
    assert count(s, select(func.count()).select_from(Correction)) == 20
    assert stored_prediction(s, victim.id) == (victim.model_version, victim.features, victim.label)
    label = count(s, select(Correction.label).where(Correction.id == relabelled.id))
    assert label == sent[3].label

    # each bad record dead-lettered once, bounded, with its reason and its hash
    records = read_topic(s.kafka_bootstrap, s.topic_deadletter, at_least=len(bad))
    assert len(records) == len(bad)
    assert all(len(r.value) <= MAX_LETTER_BYTES for r in records)
    letters = [DeadLetter.model_validate_json(r.value) for r in records]
    for name, (reason, topic, key, value) in bad.items():
        match = [d for d in letters if d.key == key.decode() and d.topic == topic]
        assert len(match) == 1, (name, [(d.key, d.reason) for d in letters])
        d = match[0]
        assert d.reason.startswith(reason), (name, d.reason)
        assert d.value_bytes == len(value)
        assert d.value_sha256 == hashlib.sha256(value).hexdigest()
        assert d.truncated == (len(value) > VALUE_CAP)
        assert d.value == value[:VALUE_CAP].decode("utf-8", errors="replace")
    assert len({(d.topic, d.partition, d.offset) for d in letters}) == len(bad)

    # the offsets were committed: a new member of the group reads only what comes after
    worker, stop, thread = start(s, "poison-2")
    try:
        marker = traffic.predictions(1, seed=3)
        traffic.send_predictions(marker)
        traffic.send_corrections(marker)
        wait_for(lambda: joined(s) == 21, what="the marker joined after the restart")
    finally:
        stop.set()
        thread.join(60)
    assert worker.stats.records == 2 and worker.stats.dead_letters == 0
    assert len(read_topic(s.kafka_bootstrap, s.topic_deadletter)) == len(bad)


def test_a_conflicting_duplicate_in_one_batch_is_dead_lettered(pg_settings):
    """Three records with one id, read in one poll: the first is stored, the second
    (other content) dead-lettered, the third (the first again) skipped."""
    s = pg_settings
    traffic = Traffic(s)
    events = traffic.predictions(5, seed=4)
    event, _ = events[0]
    other = event.model_copy(update={"latency_ms": event.latency_ms + 1})
    assert isinstance(other, PredictionEvent)
    traffic.send_raw(s.topic_predictions, event.id.encode(), event.to_json())
    traffic.send_raw(s.topic_predictions, event.id.encode(), other.to_json())
    traffic.send_predictions(events)  # `event` once more, as it was: skipped
    worker, stop, thread = start(s, "dup-1")
    try:
        wait_for(lambda: worker.stats.records >= 7, what="every record read")
        wait_for(lambda: worker.stats.dead_letters >= 1, what="the dead letter")
    finally:
        stop.set()
        thread.join(60)
    assert count(s, select(func.count()).select_from(Prediction)) == 5
    stored = count(s, select(Prediction.latency_ms).where(Prediction.id == event.id))
    assert stored == event.latency_ms  # the first delivered is kept
    letters = [
        DeadLetter.model_validate_json(r.value)
        for r in read_topic(s.kafka_bootstrap, s.topic_deadletter, at_least=1)
    ]
    assert len(letters) == 1 and letters[0].value == other.to_json().decode()
    # in one poll as a rule ("came earlier in the batch"); "is stored already" if the
    # broker handed the two records out in two polls
    reason = letters[0].reason
    assert reason.startswith(f"duplicate: prediction id {event.id!r} "), reason
    assert reason.endswith("with a different latency_ms; the first is kept"), reason
