"""The feedback worker's store side: one transaction per batch, the poison-record search,
the sweep, and retries when the database says try again.

A store that is down or busy is retried with `flywheel.retry`'s backoff for as long as it
is down (the worker used to give up after 1.5 s and exit: PostgreSQL down 22 s cost both
workers a restart); the worker's `DependencyStatus` says "store" is down meanwhile. A
refusal no retry fixes (credentials, a schema this code does not fit) raises `Fatal`.

Runs on the worker's store thread (`flywheel.feedback.worker` runs the Kafka side). In
ONE transaction a batch's valid records are written, every correction that can be joined
is joined, the pairs are analyzed and their examples written; the dead letters are then
published. Every write is idempotent (a correction is joined by exactly one transaction,
see `join`), so a batch replayed after a crash leaves the store as if nothing happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.events import CorrectionEvent, PredictionEvent, ScoreEvent, utcnow
from flywheel.feedback.attribution import (
    Attributed,
    attribute,
    recheck,
    stored_score_contents,
)
from flywheel.feedback.consumer import Partition
from flywheel.feedback.deadletter import DeadLetterWriter
from flywheel.feedback.join import (
    StoredBatch,
    claim_joins,
    expire_corrections,
    store_and_join,
    stored_contents,
)
from flywheel.feedback.messages import Rejected, duplicate_reason
from flywheel.feedback.observer import TimedAnalysis, WorkerObserver, WorkerStep
from flywheel.feedback.plan import Applied, NotNew, Plan, apply
from flywheel.feedback.prediction_cache import PredictionCache
from flywheel.retry import Backoff, DependencyStatus, Fatal, fatal_reason, transient
from flywheel.settings import FeedbackSettings
from flywheel.store import (
    Example,
    RetentionPolicy,
    default_owner,
    erased_subjects,
    insert_ignoring_duplicates,
    maintain,
    session_factory,
)

log = logging.getLogger(__name__)
Event = PredictionEvent | CorrectionEvent | ScoreEvent
T = TypeVar("T")
MAINTENANCE_TRY_S = 300.0  # how often a worker asks the store whether maintenance is due
# how long the sweeps look again at a score whose prediction was not labelled when it was
# stored (flywheel.feedback.attribution.recheck). The gap it closes is two transactions'
# last tries overlapping (a try that fails is redone, and the redo sees the other's rows),
# so a few seconds; a minute is plenty.
RECHECK_S = 60.0
RECHECK_MAX = 100_000  # predictions remembered for that; the oldest are dropped first


@dataclass
class WorkerStats:
    batches: int = 0
    records: int = 0
    predictions: int = 0
    corrections: int = 0
    joined: int = 0
    pending: int = 0  # corrections stored to wait for their prediction (joined later)
    scores: int = 0  # ScoreEvents stored (flywheel.feedback.attribution)
    outcomes: int = 0  # outcomes rows written (one per labelled prediction and version)
    examples: int = 0
    dead_letters: int = 0
    expired: int = 0
    released: int = 0
    retries: int = 0
    sweep_failures: int = 0
    maintenance_runs: int = 0  # store maintenance (retention, partitions) run by this worker
    maintenance_failures: int = 0
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
    # events that differ from an earlier one of the batch with their identity, each with
    # its letter: sent once the batch is stored, unless the store holds just what the
    # event says. The batch's first is not always what is stored: when an earlier batch
    # stored the original, a conflicting copy and then a plain redelivery of the original
    # shared a batch, and the redelivery was dead-lettered against the copy (found by
    # test_attribution_worker in CI, 1 run in ~15).
    doubtful: list[tuple[Rejected, Event]] = field(default_factory=list)


def by_kind(events: list[Event]) -> tuple[list[PredictionEvent], list[CorrectionEvent]]:
    """The predictions and the corrections (what the join takes; scores: `scores_of`)."""
    return (
        [e for e in events if isinstance(e, PredictionEvent)],
        [e for e in events if isinstance(e, CorrectionEvent)],
    )


def scores_of(events: list[Event]) -> list[ScoreEvent]:
    return [e for e in events if isinstance(e, ScoreEvent)]


def _not_erased(session: Session, events: list[Event]) -> list[Event]:
    """`events` less the corrections of erased subjects (`flywheel privacy forget`): a
    correction replayed from Kafka after its subject was erased is not stored again. One
    indexed read of `erasure_receipts`, only for a batch holding corrections with a subject
    (a batch without any pays nothing): 200 subjects against 10,000 receipts measured
    0.65 ms on SQLite, 3.3 ms on PostgreSQL (this 2-core machine, under load).

    Read in the batch's own transaction: an erasure committing while a batch with the
    subject's corrections is being stored can miss them (READ COMMITTED); forgetting the
    subject again (idempotent) removes them."""
    subjects = [e.subject for e in events if isinstance(e, CorrectionEvent) and e.subject]
    if not subjects:
        return events
    erased = erased_subjects(session, subjects)
    if not erased:
        return events
    kept = [e for e in events if not (isinstance(e, CorrectionEvent) and e.subject in erased)]
    log.info("skipped %d correction(s) of erased subjects", len(events) - len(kept))
    return kept


def _conflict_letters(batch: Batch) -> list[Rejected]:
    """Dead letters for the batch's events whose id the store holds with other content."""
    found = [c for stored in batch.stored for c in stored.conflicts]
    if not found:
        return []
    message_of = {id(e): m for m, e in batch.events}
    out = []
    for event, why in found:
        m = message_of[id(event)]
        out.append(Rejected(m.topic(), m.partition(), m.offset(), m.key(), m.value(), why))
    return out


class StoreWriter:
    """Writes batches and sweeps; counts what it did in `stats`.

    `analysis` is the worker's `TimedAnalysis`; `cache` the predictions the consumer
    thread knows (the general path looks a correction's prediction up there first);
    `dead_letters` is set once the worker is connected.
    """

    def __init__(
        self,
        feedback: FeedbackSettings,
        engine: Engine,
        analysis: TimedAnalysis,
        cache: PredictionCache,
        stats: WorkerStats,
        observer: WorkerObserver,
        release: Callable[..., int] | None = None,
    ) -> None:
        self.feedback = feedback
        self.engine = engine
        self._sessions = session_factory(engine)
        self.analysis = analysis
        self.cache = cache
        self.stats = stats
        self._step = observer.step
        self._release = release
        self.dead_letters: DeadLetterWriter | None = None
        # how a store outage is waited out; the worker sets `stop` when it runs
        self.policy = Backoff()
        self.status = DependencyStatus()
        self.stop = threading.Event()
        # store maintenance: tried every MAINTENANCE_TRY_S at most, run when the store says
        # it is due (one worker of the group a FLYWHEEL_RETENTION_EVERY_S)
        self.retention = RetentionPolicy.of(feedback)
        self._owner = default_owner()
        self._next_maintenance = 0.0  # the first sweep asks
        # predictions of scores stored before their label, by when to stop looking again
        self._unlabelled: OrderedDict[str, float] = OrderedDict()

    def store_batch(self, batch: Batch) -> None:
        """Write one polled batch: whole if the store takes it, else record by record."""
        with self._step(WorkerStep.STORE_BATCH):
            rejected = list(batch.rejected)
            try:
                rejected += self._store([e for _, e in batch.events], batch.stored, batch.plan)
                batch.whole = True
            except Exception as exc:
                if _store_fault(exc):
                    raise  # the store is down (the worker stops) or refuses us: not the records'
                rejected += self._store_one_by_one(batch.events, exc, batch.stored)
            conflicts = _conflict_letters(batch)
            if conflicts:  # a plan relying on this batch's predictions must not trust them
                batch.whole = False
            self._dead_letter(rejected + conflicts + self._doubtful_letters(batch.doubtful))
            self.stats.batches += 1
            self.stats.records += batch.records

    def _doubtful_letters(self, doubtful: list[tuple[Rejected, Event]]) -> list[Rejected]:
        """The letters of `Batch.doubtful` but those whose event is what the store now
        holds under its identity (a plain redelivery of a stored record). Read after the
        batch's transaction, so the store holds the first of every identity by then; one
        read per kind, and only for a batch with an in-batch conflict (rare)."""
        if not doubtful:
            return []
        events = [e for _, e in doubtful]
        scores = scores_of(events)
        joined = [e for e in events if not isinstance(e, ScoreEvent)]

        def read(session: Session) -> tuple[dict[str, Any], dict[tuple[str, str], Any]]:
            return stored_contents(session, joined), stored_score_contents(session, scores)

        by_id, by_score = self.in_transaction(read)
        letters = []
        for letter, e in doubtful:
            if isinstance(e, ScoreEvent):
                stored = by_score.get((e.prediction_id, e.model_version))
            else:
                stored = by_id.get(e.id)
            if stored is not None and duplicate_reason(e, stored, "is stored") is None:
                continue  # a redelivery of what is stored, behind a conflicting copy
            letters.append(letter)
        return letters

    def _store(
        self, events: list[Event], results: list[StoredBatch], plan: Plan | None = None
    ) -> list[Rejected]:
        """Write, join and analyze `events` in one transaction, following `plan` if there
        is one; what it stored goes to `results`, unusable pairs come back."""

        def work(session: Session) -> tuple[StoredBatch, int, list[Rejected], Attributed]:
            now = utcnow()
            kept, use = _not_erased(session, events), plan
            if len(kept) < len(events):
                use = None  # the plan holds the erased corrections: the general path
            applied: Applied | None = None
            with self._step(WorkerStep.STORE_JOIN):  # and the outcomes of what it joined
                if use is not None:
                    applied = apply(session, use, self.analysis, now)
                    stored = applied.stored
                else:
                    stored = store_and_join(session, *by_kind(kept), now, self.cache.get)
                attributed = attribute(session, scores_of(kept), stored.pairs)
            stored.conflicts += attributed.conflicts
            if applied is None:
                applied = Applied(stored, self.analysis.prepare(stored.pairs))
            examples, unusable, outcomes = self._examples(session, applied)
            self.analysis.count(session, outcomes)  # last: see ExampleBuilder.count
            return applied.stored, examples, unusable, attributed

        try:
            stored, examples, unusable, attributed = self.in_transaction(work)
        except NotNew:  # a replayed batch: rolled back; the general path skips what is there
            plan = None
            stored, examples, unusable, attributed = self.in_transaction(work)
        results.append(stored)
        self._remember_unlabelled(attributed.unlabelled)
        self.stats.scores += attributed.new_scores
        self.stats.outcomes += attributed.outcomes
        self.stats.predictions += len(stored.new_predictions)
        self.stats.corrections += stored.new_corrections
        self.stats.joined += len(stored.pairs)
        self.stats.pending += len(stored.pending)
        self.stats.examples += examples
        return unusable

    def _examples(self, session: Session, applied: Applied) -> tuple[int, list[Rejected], Counter]:
        """Write the examples of analyzed pairs: (examples written, unusable pairs, their
        error counts, for the caller to add as its transaction's last write)."""
        if not applied.prepared:
            return 0, [], Counter()
        rows, unusable, outcomes = self.analysis.finish(session, applied.prepared)
        with self._step(WorkerStep.EXAMPLE_INSERTS):
            written = insert_ignoring_duplicates(session, Example, rows, applied.example_lines)
        return written, unusable, outcomes

    def _store_one_by_one(
        self, events: list[tuple[Any, Event]], batch_error: Exception, results: list[StoredBatch]
    ) -> list[Rejected]:
        """A batch the store refused for a reason other than load: find the poison record.

        Each event is written alone (writes are idempotent, so the ones that succeed are
        stored exactly once); one that fails alone goes to the dead-letter topic with the
        error. If every event of a batch fails alone, the fault is ours, not the data's:
        re-raise, so the batch is retried after a restart instead of dead-lettering valid
        records.
        """
        log.warning(
            "the store refused a batch of %d events (%s); writing them one by one",
            len(events),
            batch_error,
        )
        rejected, failed = [], 0
        for message, event in events:
            try:
                rejected += self._store([event], results)
            except Exception as exc:
                if _store_fault(exc):
                    raise
                failed += 1
                detail = str(exc).splitlines()[0][:300] if str(exc) else ""
                rejected.append(
                    Rejected(
                        message.topic(),
                        message.partition(),
                        message.offset(),
                        message.key(),
                        message.value(),
                        f"store: {type(exc).__name__}: {detail}",
                    )
                )
        if len(events) > 1 and failed == len(events):
            raise batch_error
        return rejected

    def _dead_letter(self, rejected: list[Rejected]) -> None:
        if not rejected:
            return
        assert self.dead_letters is not None
        self.dead_letters.publish(rejected)
        self.stats.dead_letters += len(rejected)
        for r in rejected:
            reason = r.reason.split(":", 1)[0]
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1

    def sweep(self, final: bool = False) -> list[StoredBatch]:
        """Join what a concurrent worker's transaction hid from ours, release corroborated
        quarantine, expire the hopeless (`final`: the corroboration check is never
        skipped). A sweep the analysis fails is counted and retried next time."""
        with self._step(WorkerStep.SWEEP):
            return self._sweep(final)

    def _sweep(self, final: bool) -> list[StoredBatch]:
        now = utcnow()
        cutoff = now - timedelta(seconds=self.feedback.correction_expiry_s)

        waiting = list(self._unlabelled)

        def work(
            session: Session,
        ) -> tuple[StoredBatch, int, int, int, list[Rejected], tuple[int, set[str]]]:
            pairs = claim_joins(session, None, now)
            expired = expire_corrections(session, cutoff)
            attributed = attribute(session, [], pairs)
            labelled, rechecked = recheck(session, waiting) if waiting else (set(), 0)
            applied = Applied(StoredBatch(pairs=pairs), self.analysis.prepare(pairs))
            examples, unusable, outcomes = self._examples(session, applied)
            released = (
                (self._release(session, force=final) if final else self._release(session))
                if self._release
                else 0
            )
            self.analysis.count(session, outcomes)  # last: see ExampleBuilder.count
            credited = (attributed.outcomes + rechecked, labelled)
            return applied.stored, examples, released, expired, unusable, credited

        try:
            stored, examples, released, expired, unusable, (credited, found) = self.in_transaction(
                work
            )
        except Exception as exc:  # a pair the analysis cannot handle: keep consuming, retry later
            if _store_fault(exc):
                raise
            self.stats.sweep_failures += 1
            log.exception("sweep failed; the pending joins stay pending and are retried")
            return []
        self._dead_letter(unusable)
        self._forget_labelled(found)
        self.stats.outcomes += credited
        self.stats.joined += len(stored.pairs)
        self.stats.examples += examples
        self.stats.released += released
        self.stats.expired += expired
        if not final:
            self.maybe_maintain()
        return [stored]

    def _remember_unlabelled(self, prediction_ids: set[str]) -> None:
        """Predictions whose new scores found no label: the sweeps look again for a while
        (`attribution.recheck`)."""
        if not prediction_ids:
            return
        until = time.monotonic() + RECHECK_S
        for pid in prediction_ids:
            self._unlabelled[pid] = until
            self._unlabelled.move_to_end(pid)
        while len(self._unlabelled) > RECHECK_MAX:
            self._unlabelled.popitem(last=False)

    def _forget_labelled(self, labelled: set[str]) -> None:
        """Stop looking at the predictions found labelled, and at those looked at long
        enough (oldest first: the dict is in the order they were remembered)."""
        for pid in labelled:
            self._unlabelled.pop(pid, None)
        now = time.monotonic()
        while self._unlabelled:
            pid, until = next(iter(self._unlabelled.items()))
            if until > now:
                break
            del self._unlabelled[pid]

    def maybe_maintain(self) -> None:
        """Run the store's maintenance (`flywheel.store.retention`) if it is this worker's
        turn: tried at most every MAINTENANCE_TRY_S, run when no worker of the group ran it
        in the last FLYWHEEL_RETENTION_EVERY_S. A failure is logged and tried again later."""
        every = self.retention.every_s
        if not every or time.monotonic() < self._next_maintenance:
            return
        self._next_maintenance = time.monotonic() + min(every, MAINTENANCE_TRY_S)
        try:
            if maintain(self.engine, self.retention, owner=self._owner) is not None:
                self.stats.maintenance_runs += 1
        except Exception as exc:
            if isinstance(exc, Fatal):
                raise
            self.stats.maintenance_failures += 1
            log.warning("store maintenance failed (%s); tried again later", exc)

    def in_transaction(self, work: Callable[[Session], T]) -> T:
        """Run `work` in one transaction; while the database says try again (busy, a
        serialization failure, down) retry with `policy`'s backoff, for as long as it
        takes. `Fatal` on a refusal no retry fixes; if `stop` is set while waiting, the
        last error is raised (the batch stays uncommitted and is replayed)."""
        with self._step(WorkerStep.TRANSACTION):
            attempt = 0
            while True:
                try:
                    with self._sessions.begin() as session:
                        result = work(session)
                # SQLite busy, PostgreSQL down, ...: SQLAlchemy's errors, and psycopg's own
                # from the COPY path, which uses the driver connection directly
                except Exception as exc:
                    reason = fatal_reason(exc)
                    if reason is not None:
                        raise Fatal(f"store: {reason}") from exc
                    if not transient(exc):
                        raise
                    if attempt >= 3:  # a few quick retries are a busy store, not an outage
                        self.status.down("store", exc)
                    pause = self.policy.delay(attempt)
                    attempt += 1
                    self.stats.retries += 1
                    log.warning(
                        "store unavailable (%s); retry %d in %.2f s",
                        getattr(exc, "orig", None) or exc,
                        attempt,
                        pause,
                    )
                    if self.stop.wait(pause):
                        raise
                    continue
                self.status.up("store")
                return result


def _store_fault(exc: BaseException) -> bool:
    """The store failed, not the records: it is down (the worker is stopping while it waits)
    or refuses us. Such a batch is never searched for a poison record or dead-lettered."""
    return isinstance(exc, Fatal) or transient(exc)
