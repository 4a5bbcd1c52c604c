"""KafkaBatchConsumer.poll: it waits on Kafka only when there is nothing to process now.

librdkafka's batch consume blocks until the batch is full or its timeout passes; a worker
with a part-filled queue, or with corrections the aligner could release, must not sit
through that timeout. A fake client records every consume call's timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from flywheel.feedback.consumer import KafkaBatchConsumer
from flywheel.settings import Settings

P, C = "predictions", "corrections"


class Msg:
    def __init__(self, topic: str, partition: int, offset: int, ts: float) -> None:
        self._t, self._p, self._o, self._ts = topic, partition, offset, ts

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, float]:
        return (1, self._ts)

    def error(self) -> None:
        return None


class FakeClient:
    """Hands out `queued` (what librdkafka has fetched) and records consume timeouts;
    `high` is each predictions partition's high watermark."""

    def __init__(self) -> None:
        self.queued: list[Msg] = []
        self.timeouts: list[float] = []
        self.high: dict[int, int] = {}
        self.callbacks: dict[str, Any] = {}

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

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, partitions: list[TopicPartition]) -> None:
        pass


def consumer(tmp_path: Path, align: bool) -> tuple[KafkaBatchConsumer, FakeClient]:
    client = FakeClient()
    c = KafkaBatchConsumer(Settings(home=tmp_path), [P, C], client_id="t",
                           on_revoked=lambda parts: None, on_assigned=lambda parts: None,
                           align=(P, C) if align else None, client=client)
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
