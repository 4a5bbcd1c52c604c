"""The feedback worker's side of Kafka: one member of the consumer group, in batches.

Why confluent-kafka (librdkafka) and not kafka-python, as the design brief's other
clients: a feedback worker reads two records per correction, and kafka-python fetches
and parses them in pure Python, ~15 us of CPU a record holding the GIL (the whole
budget of a fast worker); librdkafka fetches, decompresses and checks them in its own
C threads, ~1 us a record of Python (docs/benchmarks.md, `bench feedback`). It also
sends heartbeats from its own thread, so a long store transaction never costs the
worker its group membership.

Offsets are never committed automatically: the worker commits, per partition, only
what its store has durably written. Those commits are sent without waiting for the
broker's answer (a sync commit held the consumer thread ~3 ms a batch, ~5 % of a
`bench feedback` run); before partitions move to another member, and before the worker
leaves, the latest offsets sent are committed again and waited for. A commit lost in a
crash only replays records that are stored already: a no-op.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flywheel.feedback.alignment import Aligner
from flywheel.retry import DependencyStatus
from flywheel.settings import FeedbackSettings, KafkaSettings

__all__ = ["KafkaBatchConsumer", "Partition", "RebalanceHook", "consumer_config"]

log = logging.getLogger(__name__)
PROBE_EVERY_S = 1.0  # while the broker is down, how often a poll asks it for metadata
# librdkafka errors that mean the broker cannot be reached (it reconnects by itself)
_BROKER_DOWN = {"_ALL_BROKERS_DOWN", "_TRANSPORT", "_RESOLVE", "_TIMED_OUT"}
Partition = tuple[str, int]  # (topic, partition)
RebalanceHook = Callable[[list[Partition]], None]


class KafkaBatchConsumer:
    """Subscribes to `topics` in the consumer group `feedback.feedback_group` on the broker
    `kafka.kafka_bootstrap` and hands out batches of messages.

    `on_revoked` runs (on the thread that calls `poll`) before partitions move to
    another member, while their offsets can still be committed; `on_assigned` after
    new ones arrive. The range assignor keeps the predictions and corrections partitions
    of the same number on the same member: both are keyed by prediction id with Kafka's
    murmur2 partitioner, so a correction usually meets its prediction in one worker.
    """

    def __init__(
        self,
        feedback: FeedbackSettings,
        kafka: KafkaSettings,
        topics: list[str],
        *,
        client_id: str,
        on_revoked: RebalanceHook,
        on_assigned: RebalanceHook,
        align: tuple[str, str] | None = None,
        max_hold_s: float = 10.0,
        max_held: int = 20_000,
        client: Any | None = None,
        status: DependencyStatus | None = None,
    ) -> None:
        """`client`: a confluent_kafka.Consumer-like object to use instead of a new
        Consumer (unit tests). `status` hears when the broker is down and back ("kafka")."""
        self._status = status or DependencyStatus()
        self._probe_topic = topics[0] if topics else None
        self._next_probe = 0.0
        self._consumer = (
            client
            if client is not None
            else self._new_client(feedback, kafka, client_id, self._on_error)
        )
        self._on_revoked, self._on_assigned = on_revoked, on_assigned
        self._assigned: set[Partition] = set()
        # `align` = (predictions topic, corrections topic): see flywheel.feedback.alignment
        self._aligner = (
            Aligner(*align, max_held=max_held, max_hold_s=max_hold_s)
            if align and max_hold_s > 0
            else None
        )
        self._paused: list[Any] = []
        self._sent: dict[Partition, int] = {}  # the latest offsets committed without waiting
        self._consumer.subscribe(
            topics, on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lose
        )

    @staticmethod
    def _new_client(
        feedback: FeedbackSettings,
        kafka: KafkaSettings,
        client_id: str,
        on_error: Callable[[Any], None],
    ) -> Any:
        from confluent_kafka import Consumer

        from flywheel.kafka_security import confluent_options

        config = {**consumer_config(feedback, kafka, client_id), **confluent_options(kafka)}
        config["error_cb"] = on_error  # SASL / TLS above
        return Consumer(config, logger=logging.getLogger("flywheel.kafka"))

    # -- broker health ------------------------------------------------------------------------
    def _on_error(self, err: Any) -> None:
        """librdkafka's error callback (inside `poll`): a broker that cannot be reached marks
        "kafka" down; librdkafka reconnects by itself, `_probe` sees it back."""
        if err.name() in _BROKER_DOWN:
            if self._status.is_up("kafka"):
                log.warning("kafka unreachable (%s); librdkafka reconnects", err.str())
            self._status.down("kafka", err.str())
        else:
            log.warning("kafka: %s", err.str())

    def _probe(self) -> None:
        """While "kafka" is down, ask the broker for a topic's metadata now and then: an
        answer means it is back (an idle worker gets no message to tell)."""
        now = time.monotonic()
        if self._status.is_up("kafka") or now < self._next_probe or self._probe_topic is None:
            return
        self._next_probe = now + PROBE_EVERY_S
        try:
            self._consumer.list_topics(self._probe_topic, timeout=PROBE_EVERY_S / 2)
        except Exception as exc:
            log.debug("kafka still unreachable: %s", exc)
            return
        self._status.up("kafka")

    # -- rebalance callbacks (called inside `poll`) ------------------------------------------
    def _assign(self, _consumer: Any, partitions: list[Any]) -> None:
        parts = [(p.topic, p.partition) for p in partitions]
        self._assigned.update(parts)
        if self._aligner is not None:
            self._start_positions([p for p in partitions if p.topic == self._aligner.leader])
        log.info("partitions assigned: %s", sorted(parts))
        self._on_assigned(parts)

    def _revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        parts = [(p.topic, p.partition) for p in partitions]
        try:
            self._on_revoked(parts)
        finally:
            self._forget(parts)

    def _lose(self, _consumer: Any, partitions: list[Any]) -> None:
        """Partitions taken away without a revocation (our session expired): another
        member may own them already, so nothing of theirs is committed."""
        parts = [(p.topic, p.partition) for p in partitions]
        self._forget(parts)
        log.warning(
            "partitions lost (session expired): %s; their offsets are not committed", sorted(parts)
        )

    def _forget(self, parts: list[Partition]) -> None:
        self._assigned.difference_update(parts)
        if self._aligner is not None:
            self._aligner.forget(parts)
        self._paused = [p for p in self._paused if (p.topic, p.partition) not in parts]

    def _start_positions(self, partitions: list[Any]) -> None:
        """Where reading starts in each predictions partition: its committed offset, or
        the log start (auto.offset.reset=earliest). Until these are known, a partition
        counts as behind."""
        aligner = self._aligner
        assert aligner is not None
        try:
            committed = self._consumer.committed(partitions, timeout=10)
        except Exception as exc:  # only alignment suffers: corrections wait up to max_hold_s
            log.warning("committed offsets unavailable (%s)", exc)
            return
        for tp in committed:
            offset = tp.offset
            if offset < 0:
                low, _high = self._consumer.get_watermark_offsets(tp, timeout=10)
                offset = low
            aligner.leader_next[tp.partition] = offset

    def _lagging(self, partition: int) -> bool:
        """Predictions partition `partition` has records this member has not read yet
        (as of the last fetch response's high watermark)."""
        from confluent_kafka import TopicPartition

        assert self._aligner is not None
        position = self._aligner.leader_next.get(partition)
        if position is None:
            return True
        _low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self._aligner.leader, partition), cached=True
        )
        return high < 0 or high > position

    # -- the batch interface ------------------------------------------------------------------
    def poll(self, max_records: int, timeout_s: float) -> tuple[list[Any], dict[Partition, int]]:
        """Up to `max_records` messages (confluent_kafka.Message) to process now, and the
        next offset to commit per partition once they are stored. Errors are logged, and
        a fatal one raises.

        Waits up to `timeout_s` only when there is nothing to process at once: librdkafka's
        batch consume waits for a *full* batch until its timeout, so a single blocking call
        would let a worker with a backlog sit idle beside a part-filled queue, or beside
        corrections the aligner could release (`bench feedback`: ~0.2 s of a 4.5 s run).
        """
        self._probe()
        messages = self._consume(max_records, 0)  # what is queued already, without waiting
        if self._aligner is None:
            if not messages and timeout_s > 0:
                messages = self._consume(max_records, timeout_s)
            return messages, {(m.topic(), m.partition()): m.offset() + 1 for m in messages}
        admitted, offsets = self._admit(messages, max_records)
        if admitted or timeout_s <= 0:
            return admitted, offsets
        admitted, later = self._admit(self._consume(max_records, timeout_s), max_records)
        return admitted, {**offsets, **later}  # a partition's later position wins

    def _consume(self, max_records: int, timeout_s: float) -> list[Any]:
        from confluent_kafka import KafkaError, KafkaException

        messages = self._consumer.consume(max_records, timeout_s)
        if any(m.error() for m in messages):
            good = []
            for m in messages:
                err = m.error()
                if err is None:
                    good.append(m)
                elif err.fatal():
                    raise KafkaException(err)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.warning("kafka: %s", err)
            messages = good
        if messages and not self._status.is_up("kafka"):
            self._status.up("kafka")
        return messages

    def _admit(
        self, messages: list[Any], max_records: int
    ) -> tuple[list[Any], dict[Partition, int]]:
        assert self._aligner is not None
        leader = self._aligner.leader
        admitted = self._aligner.admit(
            messages,
            self._lagging,
            [p for t, p in self._assigned if t == leader],
            time.monotonic(),
            limit=max_records,
        )
        self._pause_while_full()
        return admitted

    def _pause_while_full(self) -> None:
        """Stop fetching corrections while too many are held; resume once half are out."""
        from confluent_kafka import TopicPartition

        assert self._aligner is not None
        if not self._paused and self._aligner.full():
            self._paused = [
                TopicPartition(t, p) for t, p in self._assigned if t == self._aligner.follower
            ]
            self._consumer.pause(self._paused)
        elif self._paused and self._aligner.held <= self._aligner.max_held // 2:
            self._consumer.resume(self._paused)
            self._paused = []

    def assignment(self) -> set[Partition]:
        return set(self._assigned)

    def commit(self, offsets: dict[Partition, int], wait: bool = True) -> bool:
        """Commit the next offsets to read; False if Kafka refused (after a rebalance: the
        records are stored, so the new owner's replay is a no-op). `wait=False` sends
        them without waiting for the answer (a refusal is logged); `settle` waits."""
        from confluent_kafka import KafkaException, TopicPartition

        if not offsets:
            return True
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=not wait,
            )
        except KafkaException as exc:
            log.warning("offset commit refused (%s); the next owner replays stored records", exc)
            return False
        if wait:
            for tp in offsets:
                self._sent.pop(tp, None)
        else:
            self._sent.update(offsets)
        return True

    def settle(self, offsets: dict[Partition, int] | None = None) -> bool:
        """Commit `offsets` and the latest ones sent without waiting, for the partitions
        this member still owns, and wait for the answer: before partitions move on, and
        before leaving the group."""
        owned = self._assigned
        merged = {tp: o for tp, o in {**self._sent, **(offsets or {})}.items() if tp in owned}
        self._sent.clear()
        return self.commit(merged)

    def close(self) -> None:
        """Leave the group (revoking first, so the worker commits what it stored)."""
        self._consumer.close()


def consumer_config(feedback: FeedbackSettings, kafka: KafkaSettings, client_id: str) -> dict:
    """The librdkafka settings of a feedback worker's consumer.

    Group timing (docs/feedback.md, "Broker pauses"): the session timeout is
    FLYWHEEL_FEEDBACK_SESSION_TIMEOUT_MS and heartbeats go every quarter of it (at least
    300 ms), from librdkafka's own thread, so a long store transaction never misses one.
    After a broker pause longer than the session, the group needs about twice the session
    timeout to hand the partitions out again (`python -m bench rejoin`, a 25 s SIGSTOP of
    the test broker: 18.2 s at 10 s, 11 s at 6 s, 4.0 s at 2 s); librdkafka's reconnect
    backoff and request timeouts made no difference there. max.poll.interval.ms stays
    librdkafka's 5 minutes: the worker polls between batches, and a store outage that holds
    it longer makes it leave the group and rejoin on its next poll (its uncommitted records
    are replayed: a no-op once stored).
    """
    timeout = feedback.feedback_session_timeout_ms
    return {
        "bootstrap.servers": kafka.kafka_bootstrap,
        "group.id": feedback.feedback_group,
        "client.id": client_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": timeout,
        "heartbeat.interval.ms": max(300, timeout // 4),
        "partition.assignment.strategy": "range",
        "queued.max.messages.kbytes": 32_768,  # prefetch at most 32 MB
        "on_commit": _log_refused_commit,
    }


def _log_refused_commit(err: Any, partitions: list[Any]) -> None:
    """librdkafka's answer to a commit (called inside `poll`): only a refusal matters."""
    if err is not None:
        log.warning(
            "offset commit refused (%s) for %s; the next owner replays stored records",
            err,
            sorted((p.topic, p.partition) for p in partitions),
        )
