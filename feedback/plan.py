"""A batch prepared on the consumer thread, then applied in one store transaction.

Most of what a batch costs needs no store: finding each correction's prediction (in the
batch itself, in an earlier batch on its way to the store, or among the predictions the
worker stored recently), analyzing the pairs and making their counterexamples, encoding
rows for COPY (PostgreSQL only). `Planner.prepare` does that on the consumer thread while
the store thread writes the batch before it; `apply` then writes, in one transaction, and
finishes only what needed the store: predictions not in memory, the pending corrections
that a new prediction claims, the per-source budget.

`apply` assumes a batch's events are new -- true of every batch but a replay -- and
raises `NotNew` as soon as one is not; the worker then rolls back and writes the batch
the general way (`join.store_and_join`), which is exactly as correct and slower. Nothing
here is trusted that the store could contradict: a correction is only ever joined by the
transaction whose INSERT created it or whose update claimed it.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from sqlalchemy.orm import Session

from flywheel.events import CorrectionEvent, PredictionEvent
from flywheel.feedback.join import (
    JoinedPair,
    StoredBatch,
    claim_for,
    correction_row,
    first_of_each,
    lookup_predictions,
    pair_of,
    prediction_columns,
    prediction_row,
)
from flywheel.feedback.messages import Rejected
from flywheel.feedback.prediction_cache import KnownPrediction, PredictionCache
from flywheel.store import (
    CopyRows,
    Correction,
    EncodedRows,
    Example,
    Prediction,
    copy_all_new,
    encode_columns,
    insert_all_new,
)

if TYPE_CHECKING:  # the builder imports torch; the plan itself does not need it
    from flywheel.feedback.examples import PreparedPair

PENDING_INDEX = 100_000  # pending corrections remembered by prediction id


class Analysis(Protocol):
    """The example builder's two halves (flywheel.feedback.examples.ExampleBuilder)."""

    def prepare(self, pairs: list[JoinedPair]) -> list[PreparedPair]: ...

    def finish(
        self, session: Session, prepared: list[PreparedPair]
    ) -> tuple[list[dict], list[Rejected], Counter]: ...

    def count(self, session: Session, outcomes: Counter) -> None: ...


class NotNew(Exception):
    """Some event of the batch was stored already (a replay), or an earlier batch whose
    predictions the plan used was not stored whole: roll back, write it the general
    way."""


@dataclass
class Plan:
    predictions: list[PredictionEvent]
    corrections: list[CorrectionEvent]
    in_batch: dict[str, KnownPrediction]  # this batch's predictions
    resolved: dict[str, KnownPrediction]  # predictions of corrections, found in memory
    prepared: dict[str, PreparedPair]  # by correction id: expected joins, analyzed
    prediction_copy: CopyRows | None  # the predictions' rows, encoded for COPY
    example_lines: EncodedRows | None = None  # the prepared pairs' example rows, encoded
    # earlier batches, still in flight, whose predictions `resolved` uses: their
    # transactions come first; if one did not store its batch whole, this plan is void
    relies_on: list[Settled] = field(default_factory=list)


class Settled(Protocol):
    """An earlier batch, as a plan that relied on its predictions sees it."""

    @property
    def whole(self) -> bool:
        """Its transaction stored every event of it (no record dead-lettered)."""


@dataclass
class Applied:
    """A batch's transaction: what it stored, and its pairs analyzed, oldest first."""

    stored: StoredBatch
    prepared: list[PreparedPair] = field(default_factory=list)
    example_lines: EncodedRows | None = None  # COPY lines of (some of) their example rows


class Planner:
    """The consumer thread's side: prepares batches, and learns from each committed one
    (its new predictions go to the cache; its pending corrections to an index, so the
    batch that brings their prediction can analyze them before its claim returns)."""

    def __init__(
        self,
        analysis: Analysis,
        cache: PredictionCache,
        *,
        copy: bool = True,
        pending_capacity: int = PENDING_INDEX,
    ) -> None:
        """`copy`: the store takes COPY (PostgreSQL), so rows are encoded for it here."""
        self.analysis, self.cache, self.copy = analysis, cache, copy
        self._pending: OrderedDict[str, list[CorrectionEvent]] = OrderedDict()
        self._pending_capacity = pending_capacity
        # predictions of batches handed to the store thread and not yet committed
        self._in_flight: dict[str, tuple[KnownPrediction, Settled]] = {}
        self._in_flight_ids: dict[int, list[str]] = {}  # by id(batch)

    def prepare(
        self,
        predictions: Iterable[PredictionEvent],
        corrections: Iterable[CorrectionEvent],
        batch: Settled | None = None,
    ) -> Plan:
        """The plan of a batch. With `batch` (the worker's pipeline), its predictions
        count as known to the batches prepared after it until `settled(batch)`."""
        predictions, corrections = (
            first_of_each(list(predictions)),
            first_of_each(list(corrections)),
        )
        in_batch = {e.id: KnownPrediction.of(e) for e in predictions}
        resolved: dict[str, KnownPrediction] = {}
        relies_on: dict[int, Settled] = {}
        pairs: list[JoinedPair] = []
        in_flight, cache = self._in_flight, self.cache
        for c in corrections:
            pid = c.prediction_id
            hit = in_batch.get(pid)
            if hit is None:
                earlier = in_flight.get(pid)
                if earlier is not None:
                    hit = earlier[0]
                    relies_on[id(earlier[1])] = earlier[1]
                else:
                    hit = cache.get(pid)
            if hit is not None:
                resolved[pid] = hit
                pairs.append(pair_of(c.id, pid, c.label, c.source, c.timestamp, hit, c.subject))
        for pid, known in in_batch.items():  # the claims it will most likely make
            for c in self._pending.get(pid, ()):
                pairs.append(pair_of(c.id, pid, c.label, c.source, c.timestamp, known, c.subject))
        prepared = {pp.pair.correction_id: pp for pp in self.analysis.prepare(pairs)}
        prediction_copy = example_lines = None
        if self.copy:
            prediction_copy = encode_columns(Prediction, prediction_columns(predictions))
            example_lines = EncodedRows.of(
                Example,
                [
                    r
                    for pp in prepared.values()
                    if pp.row is not None
                    for r in (pp.row, *(pp.variants or ()))
                ],
            )
        plan = Plan(
            predictions,
            corrections,
            in_batch,
            resolved,
            prepared,
            prediction_copy,
            example_lines,
            list(relies_on.values()),
        )
        if batch is not None and in_batch:
            for pid, known in in_batch.items():
                in_flight[pid] = (known, batch)
            self._in_flight_ids[id(batch)] = list(in_batch)
        return plan

    def settled(self, batch: Settled) -> None:
        """`batch` left the pipeline (committed, or abandoned): its predictions are known
        from the cache now, if its transactions stored them."""
        for pid in self._in_flight_ids.pop(id(batch), ()):
            entry = self._in_flight.get(pid)
            if entry is not None and entry[1] is batch:
                del self._in_flight[pid]

    def committed(self, stored: StoredBatch) -> None:
        """A batch's transaction committed: remember what it stored."""
        self.cache.update(stored.known)
        pending = self._pending
        for pair in stored.pairs:
            pending.pop(pair.prediction_id, None)
        for c in stored.pending:
            pending.setdefault(c.prediction_id, []).append(c)
        while len(pending) > self._pending_capacity:
            pending.popitem(last=False)


def apply(session: Session, plan: Plan, analysis: Analysis, now: datetime) -> Applied:
    """Write a prepared batch and join what it can (see `join.store_and_join`, whose
    result it reproduces); raises NotNew if an event was stored already, or if an
    earlier batch whose predictions the plan used was not stored whole."""
    if not all(batch.whole for batch in plan.relies_on):
        raise NotNew("a batch this plan relied on was not stored whole")
    stored = StoredBatch()
    if plan.prediction_copy is not None and session.get_bind().dialect.name == "postgresql":
        new = copy_all_new(session, plan.prediction_copy)
    else:
        new = insert_all_new(session, Prediction, [prediction_row(e) for e in plan.predictions])
    if not new:
        raise NotNew("a prediction of the batch is stored already")
    stored.new_predictions, stored.known = plan.predictions, plan.in_batch
    found = dict(plan.resolved)
    missing = {c.prediction_id for c in plan.corrections if c.prediction_id not in found}
    if missing:
        found.update(lookup_predictions(session, missing))
    rows = [correction_row(c, c.prediction_id in found, now) for c in plan.corrections]
    if not insert_all_new(session, Correction, rows):
        raise NotNew("a correction of the batch is stored already")
    stored.new_corrections = len(rows)
    unprepared: list[JoinedPair] = []
    prepared: list[PreparedPair] = []
    for c in plan.corrections:
        if c.prediction_id not in found:
            stored.pending.append(c)
        elif c.id in plan.prepared:
            prepared.append(plan.prepared[c.id])
        else:  # its prediction was read from the store just now
            unprepared.append(
                pair_of(
                    c.id,
                    c.prediction_id,
                    c.label,
                    c.source,
                    c.timestamp,
                    found[c.prediction_id],
                    c.subject,
                )
            )
    for pair in claim_for(session, plan.in_batch, now):
        expected = plan.prepared.get(pair.correction_id)
        if expected is not None and expected.pair == pair:
            prepared.append(expected)
        else:
            unprepared.append(pair)
    if unprepared:
        prepared += analysis.prepare(unprepared)
    prepared.sort(key=lambda pp: (pp.pair.corrected_at, pp.pair.correction_id))
    stored.pairs = [pp.pair for pp in prepared]
    return Applied(stored, prepared, plan.example_lines)
