"""`flywheel feedback`: one worker of the consumer group that feeds the training store.

Per poll: validate every record (refused ones go to the dead-letter topic); in ONE store
transaction write the valid ones, join every correction that can be joined, analyze the
pairs and write their examples; publish the dead letters; and only then commit the Kafka
offsets. A crash anywhere replays the batch, and every write is idempotent (a correction
is joined by exactly one transaction, see `join`), so the store ends up as if nothing had
happened.

Two threads: the consumer thread polls, decodes and prepares batch k+1 (the in-memory
join, the analysis, the counterexamples: `plan`) while the store thread runs batch k's
transaction, so Python and PostgreSQL work at the same time instead of taking turns.
Offsets are committed by the consumer thread, in poll order, only for batches whose
transaction is done; a partition revocation first waits for the batches in flight, so
no other member starts from an offset whose records are not stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flywheel.events import CorrectionEvent, PredictionEvent, utcnow
from flywheel.feedback.consumer import KafkaBatchConsumer, Partition
from flywheel.feedback.deadletter import DeadLetterWriter
from flywheel.feedback.join import StoredBatch, claim_joins, expire_corrections, store_and_join
from flywheel.feedback.messages import Rejected, decode
from flywheel.feedback.plan import Analysis, Applied, NotNew, Plan, Planner, apply
from flywheel.feedback.prediction_cache import PredictionCache
from flywheel.settings import Settings
from flywheel.store import Example, insert_ignoring_duplicates, session_factory

log = logging.getLogger(__name__)
Event = PredictionEvent | CorrectionEvent
RETRIES = 5
IN_FLIGHT = 4  # batches polled but not yet committed: one in the store, three waiting
T = TypeVar("T")


@dataclass
class WorkerStats:
    batches: int = 0
    records: int = 0
    predictions: int = 0
    corrections: int = 0
    joined: int = 0
    pending: int = 0  # corrections stored to wait for their prediction (joined later)
    examples: int = 0
    dead_letters: int = 0
    expired: int = 0
    released: int = 0
    retries: int = 0
    sweep_failures: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class Batch:
    """One poll, decoded: what the store thread writes and the offsets it then frees."""

    events: list[tuple[Any, Event]]  # each with its Kafka message, should it fail alone
    rejected: list[Rejected]
    offsets: dict[Partition, int]  # the next offset to read, per partition
    records: int
    plan: Plan | None = None  # prepared on the consumer thread (None: the general path)
    sweep: bool = False  # not a poll: the periodic sweep, run in turn with the batches
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    stored: list[StoredBatch] = field(default_factory=list)  # its committed transactions
    whole: bool = False  # stored in one transaction, no record dead-lettered by the store


class FeedbackWorker:
    def __init__(self, settings: Settings, engine: Engine, analysis: Analysis,
                 *, sweep_every_s: float = 5.0, client_id: str | None = None,
                 release: Callable[..., int] | None = None) -> None:
        if not settings.kafka_bootstrap:
            raise ValueError("the feedback worker needs FLYWHEEL_KAFKA_BOOTSTRAP")
        self.settings = settings
        self._sessions = session_factory(engine)
        self.analysis = analysis
        self._release = release
        self._sweep_every_s = sweep_every_s
        self._next_sweep = 0.0
        self._client_id = client_id
        self._kinds = {settings.topic_predictions: "prediction",
                       settings.topic_corrections: "correction"}
        self.stats = WorkerStats()
        self.cache = PredictionCache(settings.feedback_prediction_cache)
        # the consumer thread's only; rows are encoded for COPY where the store takes it
        self._planner = Planner(analysis, self.cache,
                                copy=engine.dialect.name == "postgresql")
        self._consumer: KafkaBatchConsumer | None = None
        self._dead_letters: DeadLetterWriter | None = None
        self._jobs: queue.Queue[Batch | None] = queue.Queue(maxsize=IN_FLIGHT)
        self._in_flight: deque[Batch] = deque()
        self._store_thread: threading.Thread | None = None
        self._on_batch: Callable[[WorkerStats], None] | None = None

    @property
    def assignment(self) -> set[Partition]:
        """The (topic, partition) pairs this member owns now; empty until it has joined its
        group. How a caller sees several workers share the partitions."""
        consumer = self._consumer
        return consumer.assignment() if consumer is not None else set()

    # -- lifecycle ----------------------------------------------------------------------
    def _connect(self) -> None:
        s = self.settings
        self._consumer = KafkaBatchConsumer(
            s, list(self._kinds), client_id=self._client_id or "flywheel-feedback",
            on_revoked=self._on_revoked, on_assigned=self._on_assigned,
            align=(s.topic_predictions, s.topic_corrections), max_hold_s=s.feedback_align_hold_s,
            max_held=10 * s.feedback_max_records)
        self._dead_letters = DeadLetterWriter(s.kafka_bootstrap, s.topic_deadletter)

    def run(self, stop: threading.Event, on_batch: Callable[[WorkerStats], None] | None = None
            ) -> WorkerStats:
        """Consume until `stop` is set; leaves the group cleanly so partitions move on.

        `on_batch` is called after each batch's offsets are committed.
        """
        self._connect()
        assert self._consumer is not None
        self._on_batch = on_batch
        self._store_thread = threading.Thread(target=self._store_loop,
                                              name="feedback-store", daemon=True)
        self._store_thread.start()
        max_records = self.settings.feedback_max_records
        failed = True
        try:
            while not stop.is_set():
                self._commit_done()
                # Short polls while batches are in flight, so their commits are not late.
                messages, offsets = self._consumer.poll(max_records,
                                                        0.02 if self._in_flight else 0.5)
                if messages:
                    self._submit(self._decode(messages, offsets))
                if time.monotonic() >= self._next_sweep:  # on the store thread, in turn
                    self._next_sweep = time.monotonic() + self._sweep_every_s
                    self._submit(Batch([], [], {}, 0, sweep=True))
            self._drain()
            self._consumer.settle()  # the commits sent without waiting, waited for
            failed = False
        finally:
            self._stop_store_thread(wait=not failed)
            if not failed:
                self._consumer.close()  # revokes: nothing is in flight, nothing to wait for
                # a stopped worker leaves no join or release for later
                for stored in self.sweep(final=True):
                    self._planner.committed(stored)
            else:  # leave the group without committing what may not be stored
                self._in_flight.clear()
                self._consumer.close()
            if self._dead_letters:
                self._dead_letters.close()
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
            self._consumer.commit({tp: pos for tp, pos in batch.offsets.items() if tp in owned},
                                  wait=False)
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
        deadline = time.monotonic() + self.settings.feedback_session_timeout_ms / 1000
        offsets: dict[Partition, int] = {}
        while self._in_flight:
            batch = self._in_flight[0]
            if not batch.done.wait(max(0.0, deadline - time.monotonic())) \
                    or batch.error is not None:
                break
            self._in_flight.popleft()
            self._settle(batch)
            offsets.update(batch.offsets)
        assert self._consumer is not None
        self._consumer.settle(offsets)  # and every commit sent without waiting
        log.info("partitions revoked: %s; offsets of %d partitions committed",
                 sorted(revoked), len(offsets))

    def _on_assigned(self, assigned: list[Partition]) -> None:
        """Nothing to do; a hook for callers that time or log assignments."""

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
        events: list[tuple[Any, Event]] = []
        rejected: list[Rejected] = []
        kinds = self._kinds
        for m in messages:
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            event = decode(kinds[topic], topic, partition, offset, m.key(), m.value())
            if isinstance(event, Rejected):
                rejected.append(event)
            else:
                events.append((m, event))
        batch = Batch(events, rejected, offsets, len(messages))
        batch.plan = self._prepare([e for _, e in events], batch)
        return batch

    def _prepare(self, events: list[Event], batch: Batch | None = None) -> Plan | None:
        """The batch's plan; None (the store thread takes the general path) if preparing
        failed: a record the analysis refuses is found and dead-lettered there."""
        try:
            return self._planner.prepare(*_by_kind(events), batch)
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
                        self._store_batch(batch)
                except BaseException as exc:  # handed to the consumer thread, which raises
                    failed = exc
            batch.error = failed
            batch.done.set()

    def _store_batch(self, batch: Batch) -> None:
        rejected = list(batch.rejected)
        try:
            rejected += self._store([e for _, e in batch.events], batch.stored, batch.plan)
            batch.whole = True
        except OperationalError:
            raise  # the store is down or busy beyond retries: not the records' fault
        except Exception as exc:
            rejected += self._store_one_by_one(batch.events, exc, batch.stored)
        self._dead_letter(rejected)
        self.stats.batches += 1
        self.stats.records += batch.records

    def _store(self, events: list[Event], results: list[StoredBatch], plan: Plan | None = None
               ) -> list[Rejected]:
        """Write, join and analyze `events` in one transaction, following `plan` if there
        is one; what it stored goes to `results`, unusable pairs come back."""

        def work(session: Session) -> tuple[StoredBatch, int, list[Rejected]]:
            now = utcnow()
            if plan is not None:
                applied = apply(session, plan, self.analysis, now)
            else:
                stored = store_and_join(session, *_by_kind(events), now, self.cache.get)
                applied = Applied(stored, self.analysis.prepare(stored.pairs))
            examples, unusable, outcomes = self._examples(session, applied)
            self.analysis.count(session, outcomes)  # last: see ExampleBuilder.count
            return applied.stored, examples, unusable

        try:
            stored, examples, unusable = self._in_transaction(work)
        except NotNew:  # a replayed batch: rolled back; the general path skips what is there
            plan = None
            stored, examples, unusable = self._in_transaction(work)
        results.append(stored)
        self.stats.predictions += len(stored.new_predictions)
        self.stats.corrections += stored.new_corrections
        self.stats.joined += len(stored.pairs)
        self.stats.pending += len(stored.pending)
        self.stats.examples += examples
        return unusable

    def _examples(self, session: Session, applied: Applied
                  ) -> tuple[int, list[Rejected], Counter]:
        """Write the examples of analyzed pairs: (examples written, unusable pairs, their
        error counts, for the caller to add as its transaction's last write)."""
        if not applied.prepared:
            return 0, [], Counter()
        rows, unusable, outcomes = self.analysis.finish(session, applied.prepared)
        written = insert_ignoring_duplicates(session, Example, rows, applied.example_lines)
        return written, unusable, outcomes

    def _store_one_by_one(self, events: list[tuple[Any, Event]], batch_error: Exception,
                          results: list[StoredBatch]) -> list[Rejected]:
        """A batch the store refused for a reason other than load: find the poison record.

        Each event is written alone (writes are idempotent, so the ones that succeed are
        stored exactly once); one that fails alone goes to the dead-letter topic with the
        error. If every event of a batch fails alone, the fault is ours, not the data's:
        re-raise, so the batch is retried after a restart instead of dead-lettering valid
        records.
        """
        log.warning("the store refused a batch of %d events (%s); writing them one by one",
                    len(events), batch_error)
        rejected, failed = [], 0
        for message, event in events:
            try:
                rejected += self._store([event], results)
            except OperationalError:
                raise
            except Exception as exc:
                failed += 1
                detail = str(exc).splitlines()[0][:300] if str(exc) else ""
                rejected.append(Rejected(message.topic(), message.partition(), message.offset(),
                                         message.key(), message.value(),
                                         f"store: {type(exc).__name__}: {detail}"))
        if len(events) > 1 and failed == len(events):
            raise batch_error
        return rejected

    def _dead_letter(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        assert self._dead_letters is not None
        self._dead_letters.publish(rejected)
        self.stats.dead_letters += len(rejected)
        for r in rejected:
            reason = r.reason.split(":", 1)[0]
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1

    def sweep(self, final: bool = False) -> list[StoredBatch]:
        """Join what a concurrent worker's transaction hid from ours, release corroborated
        quarantine, expire the hopeless. Runs on the store thread between batches (and
        once more on the consumer thread when the worker stops, after the store thread:
        `final`, when the corroboration check is never skipped)."""
        self._next_sweep = time.monotonic() + self._sweep_every_s
        now = utcnow()
        cutoff = now - timedelta(seconds=self.settings.correction_expiry_s)

        def work(session: Session) -> tuple[StoredBatch, int, int, int, list[Rejected]]:
            pairs = claim_joins(session, None, now)
            expired = expire_corrections(session, cutoff)
            applied = Applied(StoredBatch(pairs=pairs), self.analysis.prepare(pairs))
            examples, unusable, outcomes = self._examples(session, applied)
            released = (self._release(session, force=final) if final
                        else self._release(session)) if self._release else 0
            self.analysis.count(session, outcomes)  # last: see ExampleBuilder.count
            return applied.stored, examples, released, expired, unusable

        try:
            stored, examples, released, expired, unusable = self._in_transaction(work)
        except OperationalError:
            raise
        except Exception:  # a pair the analysis cannot handle: keep consuming, retry later
            self.stats.sweep_failures += 1
            log.exception("sweep failed; the pending joins stay pending and are retried")
            return []
        self._dead_letter(unusable)
        self.stats.joined += len(stored.pairs)
        self.stats.examples += examples
        self.stats.released += released
        self.stats.expired += expired
        return [stored]

    def _in_transaction(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one transaction; retry when the database says try again."""
        for attempt in range(1, RETRIES + 1):
            try:
                with self._sessions.begin() as session:
                    return work(session)
            except OperationalError as exc:  # SQLite busy, PostgreSQL serialization, ...
                if attempt == RETRIES:
                    raise
                self.stats.retries += 1
                log.warning("store busy (%s); retry %d", exc.orig, attempt)
                time.sleep(0.05 * 2 ** attempt)
        raise AssertionError("unreachable")


def _by_kind(events: list[Event]) -> tuple[list[PredictionEvent], list[CorrectionEvent]]:
    return ([e for e in events if isinstance(e, PredictionEvent)],
            [e for e in events if isinstance(e, CorrectionEvent)])
