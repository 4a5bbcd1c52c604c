"""`flywheel feedback`: one worker of the consumer group that feeds the training store.

Per poll: validate every record (refused ones go to the dead-letter topic), write the
valid ones and the joins they complete in ONE store transaction, publish the dead
letters, and only then commit the Kafka offsets. A crash anywhere replays the batch,
and every write is idempotent, so the store ends up as if nothing had happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from flywheel.events import CorrectionEvent, PredictionEvent, utcnow
from flywheel.feedback.deadletter import DeadLetterWriter
from flywheel.feedback.join import JoinedPair, claim_joins, expire_corrections, store_events
from flywheel.feedback.messages import Rejected, decode
from flywheel.feedback.store import Example, insert_ignoring_duplicates, session_factory
from flywheel.settings import Settings

log = logging.getLogger(__name__)
ExamplesFor = Callable[[Session, list[JoinedPair]], tuple[list[dict], list[Rejected]]]
RETRIES = 5
T = TypeVar("T")


@dataclass
class WorkerStats:
    batches: int = 0
    records: int = 0
    predictions: int = 0
    corrections: int = 0
    joined: int = 0
    examples: int = 0
    dead_letters: int = 0
    expired: int = 0
    released: int = 0
    retries: int = 0
    sweep_failures: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class FeedbackWorker:
    def __init__(self, settings: Settings, engine: Engine, examples_for: ExamplesFor,
                 *, sweep_every_s: float = 5.0, client_id: str | None = None,
                 release: Callable[[Session], int] | None = None) -> None:
        if not settings.kafka_bootstrap:
            raise ValueError("the feedback worker needs FLYWHEEL_KAFKA_BOOTSTRAP")
        self.settings = settings
        self._sessions = session_factory(engine)
        self._examples_for = examples_for
        self._release = release
        self._sweep_every_s = sweep_every_s
        self._next_sweep = 0.0
        self._client_id = client_id
        self._kinds = {settings.topic_predictions: "prediction",
                       settings.topic_corrections: "correction"}
        self.stats = WorkerStats()
        self._consumer = None
        self._dead_letters: DeadLetterWriter | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def _connect(self) -> None:
        from kafka import KafkaConsumer

        s = self.settings
        self._consumer = KafkaConsumer(
            *self._kinds, bootstrap_servers=s.kafka_bootstrap, group_id=s.feedback_group,
            client_id=self._client_id or "flywheel-feedback", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=s.feedback_session_timeout_ms,
            heartbeat_interval_ms=max(300, s.feedback_session_timeout_ms // 4),
            max_poll_records=s.feedback_max_records,
        )
        self._dead_letters = DeadLetterWriter(s.kafka_bootstrap, s.topic_deadletter)

    def run(self, stop: threading.Event, on_batch: Callable[[WorkerStats], None] | None = None
            ) -> WorkerStats:
        """Consume until `stop` is set; leaves the group cleanly so partitions move on."""
        self._connect()
        assert self._consumer is not None
        try:
            while not stop.is_set():
                polled = self._consumer.poll(timeout_ms=500)
                if polled:
                    self.process(polled)
                    self._consumer.commit({tp: _offset(recs[-1].offset + 1)
                                           for tp, recs in polled.items()})
                    if on_batch:
                        on_batch(self.stats)
                if time.monotonic() >= self._next_sweep:
                    self.sweep()
        finally:
            self._consumer.close()
            self.sweep()  # a stopped worker leaves no join or release for later
            if self._dead_letters:
                self._dead_letters.close()
        return self.stats

    # -- one batch ----------------------------------------------------------------------
    def process(self, polled: dict) -> None:
        events: list[tuple[Rejected, PredictionEvent | CorrectionEvent]] = []
        rejected: list[Rejected] = []
        for tp, records in polled.items():
            kind = self._kinds[tp.topic]
            for r in records:
                event = decode(kind, tp.topic, tp.partition, r.offset, r.key, r.value)
                if isinstance(event, Rejected):
                    rejected.append(event)
                else:  # keep the raw record, should the store refuse this one event
                    events.append((Rejected(tp.topic, tp.partition, r.offset, r.key, r.value,
                                            ""), event))
        try:
            rejected += self._store([e for _, e in events])
        except OperationalError:
            raise  # the store is down or busy beyond retries: not the records' fault
        except Exception as exc:
            rejected += self._store_one_by_one(events, exc)
        self._dead_letter(rejected)
        self.stats.batches += 1
        self.stats.records += sum(len(records) for records in polled.values())

    def _store(self, events: list[PredictionEvent | CorrectionEvent]) -> list[Rejected]:
        """Write, join and analyze `events` in one transaction; unusable pairs come back."""
        predictions = [e for e in events if isinstance(e, PredictionEvent)]
        corrections = [e for e in events if isinstance(e, CorrectionEvent)]
        touched = {e.id for e in predictions} | {e.prediction_id for e in corrections}
        new_p, new_c, joined, examples, unusable = self._in_transaction(
            lambda session: self._write(session, predictions, corrections, touched))
        self.stats.predictions += new_p
        self.stats.corrections += new_c
        self.stats.joined += joined
        self.stats.examples += examples
        return unusable

    def _store_one_by_one(self, events: list[tuple[Rejected, PredictionEvent | CorrectionEvent]],
                          batch_error: Exception) -> list[Rejected]:
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
        for raw, event in events:
            try:
                rejected += self._store([event])
            except OperationalError:
                raise
            except Exception as exc:
                failed += 1
                detail = str(exc).splitlines()[0][:300] if str(exc) else ""
                rejected.append(Rejected(raw.topic, raw.partition, raw.offset, raw.key,
                                         raw.value, f"store: {type(exc).__name__}: {detail}"))
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

    def _write(self, session: Session, predictions: list[PredictionEvent],
               corrections: list[CorrectionEvent], touched: set[str]
               ) -> tuple[int, int, int, int, list[Rejected]]:
        new_p, new_c = store_events(session, predictions, corrections)
        joined = claim_joins(session, touched, utcnow()) if touched else []
        rows, unusable = self._examples_for(session, joined)
        examples = insert_ignoring_duplicates(session, Example, rows)
        return new_p, new_c, len(joined), examples, unusable

    def sweep(self) -> None:
        """Join what a concurrent worker's transaction hid from ours, release corroborated
        quarantine, expire the hopeless."""
        self._next_sweep = time.monotonic() + self._sweep_every_s
        cutoff = utcnow() - timedelta(seconds=self.settings.correction_expiry_s)

        def work(session: Session) -> tuple[int, int, int, int, list[Rejected]]:
            joined = claim_joins(session, None, utcnow())
            rows, unusable = self._examples_for(session, joined) if joined else ([], [])
            examples = insert_ignoring_duplicates(session, Example, rows)
            released = self._release(session) if self._release else 0
            return (len(joined), examples, released, expire_corrections(session, cutoff),
                    unusable)

        try:
            joined, examples, released, expired, unusable = self._in_transaction(work)
        except OperationalError:
            raise
        except Exception:  # a pair the analysis cannot handle: keep consuming, retry later
            self.stats.sweep_failures += 1
            log.exception("sweep failed; the pending joins stay pending and are retried")
            return
        self._dead_letter(unusable)
        self.stats.joined += joined
        self.stats.examples += examples
        self.stats.released += released
        self.stats.expired += expired

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


def _offset(position: int) -> object:
    from kafka.structs import OffsetAndMetadata

    return OffsetAndMetadata(position, "", -1)
