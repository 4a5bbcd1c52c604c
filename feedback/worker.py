"""`flywheel feedback`: one worker of the consumer group that feeds the training store.

Per poll: validate every record (refused ones go to the dead-letter topic); hand the
batch to the store writer (`flywheel.feedback.writer`: ONE store transaction that writes
the valid records, joins, analyzes and writes examples; then the dead letters); and only
then commit the Kafka offsets. A crash anywhere replays the batch, and every write is
idempotent, so the store ends up as if nothing had happened. This module is the Kafka
side: poll, decode, offsets, rebalances.

Two threads: the consumer thread polls, decodes and prepares batch k+1 (the in-memory
join, the analysis, the counterexamples: `plan`) while the store thread runs batch k's
transaction, so Python and PostgreSQL work at the same time instead of taking turns.
Offsets are committed by the consumer thread, in poll order, only for batches whose
transaction is done; a partition revocation first waits for the batches in flight, so
no other member starts from an offset whose records are not stored.

A `WorkerObserver` sees assignments and the time of each step (`bench feedback`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from flywheel.feedback.consumer import KafkaBatchConsumer, Partition
from flywheel.feedback.deadletter import DeadLetterWriter
from flywheel.feedback.join import StoredBatch
from flywheel.feedback.messages import (
    Rejected,
    content_of,
    decode,
    duplicate_reason,
    identity,
)
from flywheel.feedback.observer import STORE_THREAD, TimedAnalysis, WorkerObserver, WorkerStep
from flywheel.feedback.plan import Analysis, Plan, Planner
from flywheel.feedback.prediction_cache import PredictionCache
from flywheel.feedback.signatures import outside_namespace, signer_of
from flywheel.feedback.writer import Batch, Event, StoreWriter, WorkerStats, by_kind
from flywheel.retry import Backoff, DependencyStatus, retry_call, transient
from flywheel.settings import FeedbackSettings, KafkaSettings, RetrySettings
from flywheel.store import KeyBook, KeyRefused

__all__ = ["Batch", "FeedbackWorker", "WorkerStats"]

log = logging.getLogger(__name__)
IN_FLIGHT = 4  # batches polled but not yet committed: one in the store, three waiting


class FeedbackWorker:
    """One member of the feedback consumer group: the Kafka pipeline, and a `StoreWriter`
    (`writer`) on a thread of its own. `observer` sees assignments and step timings.

    Takes only the settings it reads: `feedback` (group, batch size, timeouts, what the
    writer and the analysis need) and `kafka` (the broker and the topics). `keys` (with
    FLYWHEEL_AUTH=on) makes every correction prove its app (`feedback/signatures.py`).
    """

    def __init__(
        self,
        feedback: FeedbackSettings,
        kafka: KafkaSettings,
        engine: Engine,
        analysis: Analysis,
        *,
        sweep_every_s: float = 5.0,
        client_id: str | None = None,
        release: Callable[..., int] | None = None,
        observer: WorkerObserver | None = None,
        retry: RetrySettings | None = None,
        status: DependencyStatus | None = None,
        keys: KeyBook | None = None,
    ) -> None:
        """`retry`: the backoff a store outage is waited out with (default: the settings'
        defaults); `status`: where the worker says which dependency is down (its
        /readyz and `flywheel_dependency_up`)."""
        if not kafka.kafka_bootstrap:
            raise ValueError("the feedback worker needs FLYWHEEL_KAFKA_BOOTSTRAP")
        self.feedback = feedback
        self.kafka = kafka
        self._bootstrap: str = kafka.kafka_bootstrap  # checked above: the dead letters' broker
        self.engine = engine  # the caller's to dispose of once the worker has stopped
        self.analysis = analysis
        self.observer = observer or WorkerObserver()
        self._step = self.observer.step
        timed = TimedAnalysis(analysis, self.observer)
        self._sweep_every_s = sweep_every_s
        self._next_sweep = 0.0
        self._client_id = client_id
        self._kinds = {
            kafka.topic_predictions: "prediction",
            kafka.topic_corrections: "correction",
            kafka.topic_scores: "score",  # flywheel.feedback.attribution
        }
        self.stats = WorkerStats()
        self.cache = PredictionCache(feedback.feedback_prediction_cache)
        # the consumer thread's only; rows are encoded for COPY where the store takes it
        self._planner = Planner(timed, self.cache, copy=engine.dialect.name == "postgresql")
        self.writer = StoreWriter(
            feedback, engine, timed, self.cache, self.stats, self.observer, release
        )
        self.status = status or DependencyStatus()
        self.writer.status = self.status
        self.writer.policy = Backoff.of(retry) if retry is not None else Backoff()
        self.running = threading.Event()  # set while `run` consumes
        self._consumer: KafkaBatchConsumer | None = None
        self._jobs: queue.Queue[Batch | None] = queue.Queue(maxsize=IN_FLIGHT)
        self._in_flight: deque[Batch] = deque()
        self._store_thread: threading.Thread | None = None
        self._on_batch: Callable[[WorkerStats], None] | None = None
        # FLYWHEEL_AUTH=on: corrections must be signed by an app (flywheel.feedback.signatures)
        self.keys = keys

    @property
    def assignment(self) -> set[Partition]:
        """The (topic, partition) pairs this member owns now; empty until it has joined its
        group. How a caller sees several workers share the partitions."""
        consumer = self._consumer
        return consumer.assignment() if consumer is not None else set()

    # -- lifecycle ----------------------------------------------------------------------
    def _connect(self) -> None:
        """The dead-letter producer first (kafka-python's waits for the broker and raises
        if it is down: retried by `run`), then the group member, so a failed try leaves
        no consumer behind."""
        from flywheel.kafka_security import kafka_python_options

        f, k = self.feedback, self.kafka
        self.writer.dead_letters = DeadLetterWriter(
            self._bootstrap, k.topic_deadletter, **kafka_python_options(k)
        )
        self._consumer = KafkaBatchConsumer(
            f,
            k,
            list(self._kinds),
            client_id=self._client_id or "flywheel-feedback",
            on_revoked=self._on_revoked,
            on_assigned=self._on_assigned,
            align=(k.topic_predictions, k.topic_corrections),
            max_hold_s=f.feedback_align_hold_s,
            max_held=10 * f.feedback_max_records,
            status=self.status,
        )

    def run(
        self, stop: threading.Event, on_batch: Callable[[WorkerStats], None] | None = None
    ) -> WorkerStats:
        """Consume until `stop` is set; leaves the group cleanly so partitions move on.

        `on_batch` is called after each batch's offsets are committed. A store or broker
        outage is waited out (see `flywheel.feedback.writer`); stopped during one, the
        worker returns without committing what is not stored (it is replayed).
        """
        self.writer.stop = stop
        try:
            retry_call(
                self._connect,
                dependency="kafka",
                policy=self.writer.policy,
                status=self.status,
                stop=stop,
                what="connecting the worker",
            )
        except Exception as exc:
            if stop.is_set() and transient(exc):  # stopped while the broker was down
                return self.stats
            raise
        assert self._consumer is not None
        self._on_batch = on_batch
        if self.keys is not None:
            self.keys.start()  # writes the keys' last use
        self._store_thread = threading.Thread(
            target=self._store_loop, name=STORE_THREAD, daemon=True
        )
        self._store_thread.start()
        max_records = self.feedback.feedback_max_records
        failed = True
        self.running.set()
        try:
            while not stop.is_set():
                self._commit_done()
                # Short polls while batches are in flight, so their commits are not late.
                with self._step(WorkerStep.POLL):
                    messages, offsets = self._consumer.poll(
                        max_records, 0.02 if self._in_flight else 0.5
                    )
                if messages:
                    self._submit(self._decode(messages, offsets))
                if time.monotonic() >= self._next_sweep:  # on the store thread, in turn
                    self._next_sweep = time.monotonic() + self._sweep_every_s
                    self._submit(Batch([], [], {}, 0, sweep=True))
            self._drain()
            self._consumer.settle()  # the commits sent without waiting, waited for
            failed = False
        except Exception as exc:
            if not (stop.is_set() and transient(exc)):
                raise
            log.warning(
                "stopped while a dependency is down (%s); what is not stored is replayed", exc
            )
        finally:
            self.running.clear()
            self._stop_store_thread(wait=not failed)
            if not failed:
                self._consumer.close()  # revokes: nothing is in flight, nothing to wait for
                # a stopped worker leaves no join or release for later
                for stored in self.sweep(final=True):
                    self._planner.committed(stored)
            else:  # leave the group without committing what may not be stored
                self._in_flight.clear()
                self._consumer.close()
            if self.writer.dead_letters:
                self.writer.dead_letters.close()
            if self.keys is not None:
                self.keys.close()
        return self.stats

    # -- the pipeline (consumer thread) ----------------------------------------------------
    def _submit(self, batch: Batch) -> None:
        """Hand a batch to the store thread; waits while IN_FLIGHT batches are pending."""
        while len(self._in_flight) >= IN_FLIGHT:
            self._await(self._in_flight[0])
            self._commit_done()
        self._in_flight.append(batch)
        self._jobs.put(batch)

    def _await(self, batch: Batch) -> None:
        with self._step(WorkerStep.WAIT):
            while not batch.done.wait(0.5):
                assert self._store_thread is not None
                if not self._store_thread.is_alive():
                    raise RuntimeError("the feedback store thread died")

    def _commit_done(self) -> None:
        """Commit the offsets of finished batches, oldest first; stop at the first that is
        not done. A batch whose store write failed raises here, uncommitted."""
        assert self._consumer is not None
        while self._in_flight and self._in_flight[0].done.is_set():
            batch = self._in_flight[0]
            if batch.error is not None:
                raise batch.error
            self._in_flight.popleft()
            self._settle(batch)
            owned = self._consumer.assignment()  # not what a rebalance took away meanwhile
            with self._step(WorkerStep.COMMIT):
                self._consumer.commit(
                    {tp: pos for tp, pos in batch.offsets.items() if tp in owned}, wait=False
                )
            if self._on_batch and not batch.sweep:
                self._on_batch(self.stats)

    def _settle(self, batch: Batch) -> None:
        """A finished batch leaves the pipeline: the planner learns what it stored."""
        for stored in batch.stored:
            self._planner.committed(stored)
        self._planner.settled(batch)

    def _drain(self) -> None:
        """Wait for every batch in flight and commit it."""
        while self._in_flight:
            self._await(self._in_flight[0])
            self._commit_done()

    def _on_revoked(self, revoked: list[Partition]) -> None:
        """Before partitions move to another member (called inside `poll`, on the consumer
        thread): let the batches in flight finish their store write, then commit their
        offsets. A failed batch and those after it stay in flight, uncommitted, for the
        main loop to raise; a very slow one is left to finish later (its records are
        replayed by the next owner: a no-op once stored)."""
        deadline = time.monotonic() + self.feedback.feedback_session_timeout_ms / 1000
        offsets: dict[Partition, int] = {}
        while self._in_flight:
            batch = self._in_flight[0]
            if (
                not batch.done.wait(max(0.0, deadline - time.monotonic()))
                or batch.error is not None
            ):
                break
            self._in_flight.popleft()
            self._settle(batch)
            offsets.update(batch.offsets)
        assert self._consumer is not None
        self._consumer.settle(offsets)  # and every commit sent without waiting
        log.info(
            "partitions revoked: %s; offsets of %d partitions committed",
            sorted(revoked),
            len(offsets),
        )
        self.observer.on_revoked(revoked)

    def _on_assigned(self, assigned: list[Partition]) -> None:
        """Nothing to do but tell the observer."""
        self.observer.on_assigned(assigned)

    def _stop_store_thread(self, wait: bool) -> None:
        """Let the store thread finish its current batch and end; queued batches are
        dropped when `wait` is False (they were never committed: they are replayed)."""
        if self._store_thread is None:
            return
        if not wait:
            while True:
                try:
                    self._jobs.get_nowait()
                except queue.Empty:
                    break
        self._jobs.put(None)
        self._store_thread.join()
        self._store_thread = None

    # -- one batch ----------------------------------------------------------------------
    def _decode(self, messages: list[Any], offsets: dict[Partition, int]) -> Batch:
        with self._step(WorkerStep.DECODE):
            return self._decode_and_prepare(messages, offsets)

    def _decode_and_prepare(self, messages: list[Any], offsets: dict[Partition, int]) -> Batch:
        events: list[tuple[Any, Event]] = []
        rejected: list[Rejected] = []
        doubtful: list[tuple[Rejected, Event]] = []
        kinds, keys = self._kinds, self.keys
        first: dict[tuple[type, str], Event] = {}  # by `identity`
        for m in messages:
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            kind = kinds[topic]
            signer = None
            if keys is not None and kind == "correction":
                try:
                    try:
                        signer = signer_of(keys, m.headers(), m.value())
                    except Exception as exc:
                        if not transient(exc):
                            raise
                        signer = self._signer_once_the_store_is_back(m)
                except KeyRefused as exc:
                    rejected.append(
                        Rejected(topic, partition, offset, m.key(), m.value(), exc.reason)
                    )
                    continue
            event = decode(kind, topic, partition, offset, m.key(), m.value())
            if signer is not None and not isinstance(event, Rejected):
                why = outside_namespace(signer, event.source)  # type: ignore[union-attr]
                if why is not None:
                    event = Rejected(topic, partition, offset, m.key(), m.value(), why)
            if isinstance(event, Rejected):
                rejected.append(event)
                continue
            earlier = first.setdefault((type(event), identity(event)), event)
            if earlier is not event:  # the store keeps the first; a redelivery is skipped
                why = duplicate_reason(event, content_of(earlier), "came earlier in the batch")
                if why is not None:  # unless the store already held it: see `Batch.doubtful`
                    letter = Rejected(topic, partition, offset, m.key(), m.value(), why)
                    doubtful.append((letter, event))
                    continue
            events.append((m, event))
        batch = Batch(events, rejected, offsets, len(messages), doubtful=doubtful)
        batch.plan = self._prepare([e for _, e in events], batch)
        return batch

    def _signer_once_the_store_is_back(self, m: Any) -> str:
        """`signer_of` for a record whose key had to be read from a store that is down:
        waited out like the writer's store outage (flywheel.retry), not raised. Found by
        the fault suite: a key's cached row older than FLYWHEEL_AUTH_CACHE_TTL_S during a
        PostgreSQL kill made the worker exit ("error: database: connection failed")."""
        assert self.keys is not None
        keys = self.keys
        return retry_call(
            lambda: signer_of(keys, m.headers(), m.value()),
            dependency="store",
            policy=self.writer.policy,
            status=self.status,
            stop=self.writer.stop,
            what="checking a correction's signature",
        )

    def _prepare(self, events: list[Event], batch: Batch | None = None) -> Plan | None:
        """The batch's plan; None (the store thread takes the general path) if preparing
        failed: a record the analysis refuses is found and dead-lettered there."""
        try:
            return self._planner.prepare(*by_kind(events), batch)
        except Exception as exc:
            log.debug("preparing a batch failed (%s); the store thread writes it", exc)
            return None

    def _store_loop(self) -> None:
        """The store thread: batches in poll order; after a failure, none is stored."""
        failed: BaseException | None = None
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            if failed is None:
                try:
                    if batch.sweep:
                        batch.stored = self.sweep()
                    else:
                        self.writer.store_batch(batch)
                except BaseException as exc:  # handed to the consumer thread, which raises
                    failed = exc
            batch.error = failed
            batch.done.set()

    def sweep(self, final: bool = False) -> list[StoredBatch]:
        """Join what a concurrent worker's transaction hid from ours, release corroborated
        quarantine, expire the hopeless (see `StoreWriter.sweep`). Runs on the store thread
        between batches (and once more on the consumer thread when the worker stops, after
        the store thread: `final`, when the corroboration check is never skipped)."""
        self._next_sweep = time.monotonic() + self._sweep_every_s
        return self.writer.sweep(final)
