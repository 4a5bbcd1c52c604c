"""Timestamp alignment of corrections behind predictions, the batch consumer's poll around
it, and the worker's prediction cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from flywheel.events import PredictionEvent, utcnow
from flywheel.feedback.alignment import Aligner
from flywheel.feedback.consumer import KafkaBatchConsumer
from flywheel.feedback.prediction_cache import KnownPrediction, PredictionCache
from flywheel.settings import FeedbackSettings, KafkaSettings

P, C = "predictions", "corrections"


class Msg:
    """The parts of confluent_kafka.Message the aligner and the batch consumer read."""

    def __init__(self, topic: str, partition: int, offset: int, ts: float | None) -> None:
        self._t, self._p, self._o, self._ts = topic, partition, offset, ts

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, float]:
        return (0, -1) if self._ts is None else (1, self._ts)

    def error(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{self._t[0]}{self._p}@{self._o}"


def aligner(**kw) -> Aligner:
    return Aligner(P, C, max_held=kw.pop("max_held", 100), max_hold_s=kw.pop("max_hold_s", 10.0))


def test_corrections_newer_than_the_lagging_predictions_wait():
    a = aligner()
    lagging = {0: True, 1: True}
    batch = [
        Msg(P, 0, 0, 100),
        Msg(P, 1, 0, 150),
        Msg(C, 0, 0, 90),
        Msg(C, 0, 1, 120),
        Msg(C, 0, 2, 95),
        Msg(C, 1, 0, 200),
    ]
    out, offsets = a.admit(batch, lagging.get, [0, 1], now=0.0, limit=100)
    # frontier = min(100, 150): c0@0 (90) goes; c0@1 (120) waits, and c0@2 behind it
    assert [repr(m) for m in out] == ["p0@0", "p1@0", "c0@0"]
    assert offsets == {(P, 0): 1, (P, 1): 1, (C, 0): 1, (C, 1): 0}  # never past a held one
    assert a.held == 3
    # predictions partition 0 reads past 120; partition 1 is caught up (no longer counts)
    lagging = {0: True, 1: False}
    out, offsets = a.admit([Msg(P, 0, 1, 130)], lagging.get, [0, 1], now=1.0, limit=100)
    assert [repr(m) for m in out] == ["p0@1", "c0@1", "c0@2"]
    assert offsets == {(P, 0): 2, (C, 0): 3, (C, 1): 0}
    lagging = {0: False, 1: False}  # everything read: nothing waits
    out, offsets = a.admit([], lagging.get, [0, 1], now=2.0, limit=100)
    assert [repr(m) for m in out] == ["c1@0"] and offsets == {(C, 1): 1} and a.held == 0


def test_caught_up_predictions_hold_nothing_and_unknown_ones_hold_everything():
    a = aligner()
    out, _ = a.admit([Msg(C, 0, 0, 5e12)], lambda p: False, [0], now=0.0, limit=10)
    assert len(out) == 1
    # a lagging partition not read from yet: its position in time is unknown
    out, offsets = a.admit([Msg(C, 0, 1, 1)], lambda p: True, [0], now=0.0, limit=10)
    assert out == [] and offsets == {(C, 0): 1}


def test_a_held_correction_goes_after_max_hold_s_and_records_without_time_at_once():
    a = aligner(max_hold_s=5.0)
    out, _ = a.admit(
        [Msg(P, 0, 0, 10), Msg(C, 0, 0, 50), Msg(C, 1, 0, None)],
        lambda p: True,
        [0],
        now=100.0,
        limit=10,
    )
    assert [repr(m) for m in out] == ["p0@0", "c1@0"]
    out, _ = a.admit([], lambda p: True, [0], now=104.9, limit=10)
    assert out == []
    out, _ = a.admit([], lambda p: True, [0], now=105.0, limit=10)
    assert [repr(m) for m in out] == ["c0@0"]


def test_releases_at_most_limit_and_reports_full():
    a = aligner(max_held=4)
    held = [Msg(C, 0, i, 100 + i) for i in range(5)]
    a.admit([Msg(P, 0, 0, 0), *held], lambda p: True, [0], now=0.0, limit=10)
    assert a.held == 5 and a.full()
    out, offsets = a.admit([], lambda p: False, [0], now=1.0, limit=2)
    assert [repr(m) for m in out] == ["c0@0", "c0@1"] and offsets == {(C, 0): 2}
    assert a.held == 3 and not a.full()


def test_revoked_partitions_forget_what_they_held():
    a = aligner()
    a.admit(
        [Msg(P, 0, 0, 10), Msg(C, 0, 0, 50), Msg(C, 1, 0, 60)],
        lambda p: True,
        [0],
        now=0.0,
        limit=10,
    )
    a.forget([(C, 0), (P, 0)])
    assert a.held == 1
    # predictions partition 0 forgotten: its time is unknown again, so c1 still waits
    out, _ = a.admit([], lambda p: True, [0], now=1.0, limit=10)
    assert out == []


def test_frontier_is_the_earliest_lagging_partition():
    a = aligner()
    a.admit([Msg(P, 0, 0, 300), Msg(P, 1, 0, 100)], lambda p: True, [0, 1], now=0, limit=9)
    assert a._frontier(lambda p: True, [0, 1]) == 100
    assert a._frontier(lambda p: p == 0, [0, 1]) == 300
    assert a._frontier(lambda p: False, [0, 1]) == math.inf


# -- KafkaBatchConsumer.poll: waiting on Kafka only when there is nothing to process now ----
# librdkafka's batch consume blocks until the batch is full or its timeout passes; a worker
# with a part-filled queue, or with corrections the aligner could release, must not sit
# through that timeout. A fake client records every consume call's timeout.
class FakeClient:
    """Hands out `queued` (what librdkafka has fetched) and records consume timeouts;
    `high` is each predictions partition's high watermark."""

    def __init__(self) -> None:
        self.queued: list[Msg] = []
        self.timeouts: list[float] = []
        self.high: dict[int, int] = {}
        self.callbacks: dict[str, Any] = {}
        self.commits: list[tuple[dict[tuple[str, int], int], bool]] = []  # (offsets, async)

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def consume(self, n: int, timeout: float) -> list[Msg]:
        self.timeouts.append(timeout)
        out, self.queued = self.queued[:n], self.queued[n:]
        return out

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, 0) for p in partitions]

    def get_watermark_offsets(self, tp: TopicPartition, **kw: Any) -> tuple[int, int]:
        return 0, self.high.get(tp.partition, 0)

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append(({(tp.topic, tp.partition): tp.offset for tp in offsets}, asynchronous))

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, partitions: list[TopicPartition]) -> None:
        pass


def consumer(tmp_path: Path, align: bool) -> tuple[KafkaBatchConsumer, FakeClient]:
    client = FakeClient()
    c = KafkaBatchConsumer(
        FeedbackSettings(),
        KafkaSettings(),
        [P, C],
        client_id="t",
        on_revoked=lambda parts: None,
        on_assigned=lambda parts: None,
        align=(P, C) if align else None,
        client=client,
    )
    client.callbacks["on_assign"](client, [TopicPartition(P, 0), TopicPartition(C, 0)])
    return c, client


def test_queued_messages_come_at_once_and_an_empty_queue_is_waited_on(tmp_path):
    c, client = consumer(tmp_path, align=False)
    client.queued = [Msg(P, 0, i, 10) for i in range(3)]
    messages, offsets = c.poll(2000, 0.5)
    assert len(messages) == 3 and offsets == {(P, 0): 3}
    assert client.timeouts == [0]  # a part-filled queue: not waited on
    client.timeouts.clear()
    messages, offsets = c.poll(2000, 0.5)
    assert messages == [] and offsets == {}
    assert client.timeouts == [0, 0.5]


def test_releasable_corrections_are_not_kept_waiting_on_kafka(tmp_path):
    c, client = consumer(tmp_path, align=True)
    client.high[0] = 2  # two predictions to read: corrections newer than them wait
    client.queued = [Msg(C, 0, 0, 150), Msg(C, 0, 1, 160), Msg(P, 0, 0, 100)]
    messages, offsets = c.poll(2000, 0.5)
    assert [m.topic() for m in messages] == [P] and offsets == {(P, 0): 1, (C, 0): 0}
    assert client.timeouts == [0]
    # nothing new, and the corrections still newer than the lagging predictions: wait
    client.timeouts.clear()
    messages, offsets = c.poll(2000, 0.5)
    assert messages == [] and offsets == {(C, 0): 0}
    assert client.timeouts == [0, 0.5]
    # the last prediction arrives alone; then, with nothing new, the held ones go at once
    client.queued = [Msg(P, 0, 1, 200)]
    client.timeouts.clear()
    messages, offsets = c.poll(2000, 0.5)
    assert [(m.topic(), m.offset()) for m in messages] == [(P, 1), (C, 0), (C, 1)]
    assert offsets == {(P, 0): 2, (C, 0): 2} and client.timeouts == [0]


def test_what_the_wait_brings_is_admitted_with_what_came_before_it(tmp_path):
    c, client = consumer(tmp_path, align=True)
    client.high[0] = 1  # one prediction not read yet
    client.queued = [Msg(C, 0, 0, 150)]  # held behind it
    first = client.consume

    def consume(n: int, timeout: float) -> list[Msg]:
        if timeout > 0:  # the prediction arrives during the wait
            client.queued.append(Msg(P, 0, 0, 140))
        return first(n, timeout)

    client.consume = consume  # type: ignore[method-assign]
    messages, offsets = c.poll(2000, 0.5)
    assert [(m.topic(), m.offset()) for m in messages] == [(P, 0), (C, 0)]
    assert offsets == {(P, 0): 1, (C, 0): 1} and client.timeouts == [0, 0.5]


def prediction(i: int) -> PredictionEvent:
    return PredictionEvent(
        id=f"p{i}",
        model_name="m",
        model_version="1",
        features=[float(i)],
        probabilities={"a": 1.0},
        label="a",
        timestamp=utcnow(),
        latency_ms=0.1,
    )


def test_prediction_cache_keeps_the_newest_capacity_entries():
    cache = PredictionCache(3)
    for i in range(5):
        cache.update({f"p{i}": KnownPrediction.of(prediction(i))})
    assert len(cache) == 3 and cache.get("p1") is None
    assert cache.get("p4").features == [4.0] and cache.get("p4").label == "a"
    cache.update({"p9": KnownPrediction.of(prediction(9)), "p8": KnownPrediction.of(prediction(8))})
    assert cache.get("p2") is None and cache.get("p3") is None and len(cache) == 3
    off = PredictionCache(0)
    off.update({"p1": KnownPrediction.of(prediction(1))})
    assert off.get("p1") is None
    with pytest.raises(ValueError, match="capacity"):
        PredictionCache(-1)


# -- KafkaBatchConsumer.commit / settle: commits sent without waiting, then waited for ------
def test_commits_go_without_waiting_and_are_settled_before_partitions_move(tmp_path):
    c, client = consumer(tmp_path, align=False)
    client.callbacks["on_assign"](client, [TopicPartition(P, 1), TopicPartition(C, 1)])
    assert c.commit({(P, 0): 5, (C, 0): 3}, wait=False)
    assert c.commit({(P, 0): 9, (P, 1): 4}, wait=False)
    assert client.commits == [({(P, 0): 5, (C, 0): 3}, True), ({(P, 0): 9, (P, 1): 4}, True)]
    # partition P/1 moves away first: nothing of it is committed by this member any more
    client.callbacks["on_revoke"](client, [TopicPartition(P, 1)])
    client.commits.clear()
    assert c.settle({(C, 0): 7})  # the latest of each owned partition, waited for
    assert client.commits == [({(P, 0): 9, (C, 0): 7}, False)]
    client.commits.clear()
    assert c.settle()  # settled: nothing left to send
    assert client.commits == []


def test_a_waited_commit_leaves_nothing_to_settle_for_its_partitions(tmp_path):
    c, client = consumer(tmp_path, align=False)
    c.commit({(P, 0): 5, (C, 0): 3}, wait=False)
    c.commit({(P, 0): 6})
    client.commits.clear()
    c.settle()
    assert client.commits == [({(C, 0): 3}, False)]
