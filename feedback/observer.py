"""What a feedback worker lets a caller see of its run: assignments and step timings.

`bench feedback` splits a worker's time into its steps; it used to do so by replacing the
worker's private methods and patching module functions, so renaming a private method broke
the benchmark. The worker now reports its steps to an observer instead: subclass
`WorkerObserver`, override what you need (every method does nothing by default), and pass
it to `build_worker(..., observer=...)`.

    class Timings(WorkerObserver):
        def timed(self, step, seconds):
            totals[step] = totals.get(step, 0.0) + seconds

Steps nest (`decode` holds the `analysis` it runs; `store batch` and `sweep` hold their
`transaction`s, which hold `store + join`, `analysis` and `example inserts`); each is
reported on the thread that ran it: the consumer thread (the one that called `run`) or the
store thread, named "feedback-store". A default observer costs about 1 us per step, some
ten steps a batch (0.01 us a record at 1,000 records a poll).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from flywheel.feedback.consumer import Partition
    from flywheel.feedback.examples import PreparedPair
    from flywheel.feedback.join import JoinedPair
    from flywheel.feedback.messages import Rejected
    from flywheel.feedback.plan import Analysis

STORE_THREAD = "feedback-store"  # the store thread's name, as a step's thread reports it


class WorkerStep(StrEnum):
    """The steps a worker reports, by thread."""

    # the consumer thread
    POLL = "poll"  # one Kafka poll; the group join and rebalance callbacks happen inside
    DECODE = "decode"  # validating a poll's records and preparing its plan (with `analysis`)
    COMMIT = "commit offsets"  # sending a finished batch's offsets (not waited for)
    WAIT = "wait for store"  # the consumer thread waiting for the store thread
    # the store thread (and the final sweep, on the consumer thread once it stopped)
    STORE_BATCH = "store batch"  # all of a batch's store work: transactions, dead letters
    TRANSACTION = "transaction"  # one store transaction, its commit and retries included
    STORE_JOIN = "store + join"  # writing a batch's events and joining its corrections
    EXAMPLE_INSERTS = "example inserts"  # writing the analyzed pairs' examples
    SWEEP = "sweep"  # the periodic sweep: late joins, releases, expiry
    # both threads
    ANALYSIS = "analysis"  # the example builder: prepared pairs, or finished ones


class WorkerObserver:
    """Does nothing; override a method to time or log a worker (see the module doc).

    Methods are called on the worker's own threads and must not raise.
    """

    def on_assigned(self, partitions: list[Partition]) -> None:
        """The group gave this member `partitions` (inside a `poll`)."""

    def on_revoked(self, partitions: list[Partition]) -> None:
        """`partitions` moved away; the batches in flight were stored and committed first."""

    @contextmanager
    def step(self, name: WorkerStep) -> Iterator[None]:
        """Around each step; by default times it and reports it to `timed`. Override it
        for the start and end of a step (nesting, or to leave part of a step out)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timed(name, time.perf_counter() - start)

    def timed(self, name: WorkerStep, seconds: float) -> None:
        """A step took `seconds` (wall time, on the thread that ran it)."""


class TimedAnalysis:
    """The worker's analysis with its `prepare` and `finish` reported as `analysis` steps.

    Looks the wrapped analysis' methods up at each call, so replacing one on the analysis
    itself (as a test does to refuse a record) still takes effect.
    """

    def __init__(self, analysis: Analysis, observer: WorkerObserver) -> None:
        self.analysis = analysis
        self._step = observer.step

    def prepare(self, pairs: list[JoinedPair]) -> list[PreparedPair]:
        with self._step(WorkerStep.ANALYSIS):
            return self.analysis.prepare(pairs)

    def finish(
        self, session: Session, prepared: list[PreparedPair]
    ) -> tuple[list[dict], list[Rejected], Counter]:
        with self._step(WorkerStep.ANALYSIS):
            return self.analysis.finish(session, prepared)

    def count(self, session: Session, outcomes: Counter) -> None:
        self.analysis.count(session, outcomes)
