"""Logging to Kafka off the request path, with nothing lost when the broker is down.

Requests put records on a bounded queue; one sender thread batches them to Kafka with
acks=all. A record Kafka does not acknowledge in time goes to the spool, and while the
spool holds anything, new records queue behind it there, so replay keeps their order.
If the queue is full the request path appends to the spool itself instead of blocking
or dropping. Delivery is at-least-once, keyed by id.

Durable logging (`log_durable`) is group commit: each record gets a sequence number in
queue order, the sender counts how far it has handled the queue (acknowledged by Kafka,
or written to the spool, fsynced), and one batch's flush or fsync completes the future
of every request whose records it held. Concurrent requests share one round trip
instead of one each. While a request waits, the sender does not linger 50 ms; it gathers
only while records keep arriving (`_gather`): sending at once made batches of ~7 records
at 16 clients and cost ~45 us more server CPU a request than answering once queued
(`bench serve --compare corrections`); gathering makes ~13.5 records a flush at 16
clients, ~29 at 64 (`flywheel_log_batches_total`; docs/benchmarks.md). A durable
record queued while the sender lingers behind fast ones ends that linger (`_linger`). An
async caller (`log_durable_async`) is woken through one `call_soon_threadsafe` per batch
for all of its requests on that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

from flywheel.chatter import outage_over
from flywheel.service.spool import Record, Spool

__all__ = ["EventLog", "EventLogStats", "NotDurable", "Sink"]

log = logging.getLogger(__name__)


# while gathering a group commit, a step this long without a new record ends the wait
GATHER_STEP_S = 0.0005


class NotDurable(RuntimeError):
    """The sender could neither deliver nor spool a request's records (a failing disk),
    or the event log closed before it had: the caller must store them itself or refuse."""


class Sink(Protocol):
    """Where records are sent; Kafka in production, anything with this shape in tests."""

    def send(self, records: list[Record], timeout_s: float) -> list[bool]: ...
    def close(self) -> None: ...


@dataclass
class EventLogStats:
    delivered: int = 0
    spooled: int = 0
    replayed: int = 0
    send_failures: int = 0
    overflow: int = 0
    batches: int = 0  # sends of queued records: records per batch is the group commit's size
    # written to the spool by a request that waited past FLYWHEEL_DURABLE_WAIT_MS
    direct_spooled: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class EventLog:
    """Bounded queue + sender thread + spool. `log()` never blocks and never drops."""

    def __init__(
        self,
        sink_factory: Callable[[], Sink],
        spool: Spool,
        *,
        queue_size: int = 50_000,
        batch_size: int = 500,
        send_timeout_s: float = 5.0,
        retry_s: float = 1.0,
        linger_s: float = 0.0,
        durable_linger_s: float = 0.0,
    ) -> None:
        self._sink_factory = sink_factory
        self._sink: Sink | None = None
        self.spool = spool
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._timeout_s = send_timeout_s
        self._retry_s = retry_s
        self._linger_s = linger_s
        self._durable_linger_s = durable_linger_s
        self._next_retry = 0.0
        self._stop = threading.Event()
        # ends the sender's fast linger early: set by a durable request and by close()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flywheel-event-log", daemon=True)
        self.stats = EventLogStats()
        self.connected = False
        # group commit: queue positions handed out (`_enqueued`) and handled by the sender
        # (`_handled`), the futures waiting on a position, and positions the sender lost
        self._seq_lock = threading.Lock()
        self._enqueued = 0
        self._handled = 0
        self._waiters: deque[tuple[int, int, Waiter]] = deque()
        self._lost: list[tuple[int, int]] = []

    # -- request path -------------------------------------------------------------------
    def log(self, topic: str, key: str, value: bytes) -> None:
        self._enqueue([Record(topic, key.encode(), value)])

    def log_many(self, records: list[Record]) -> None:
        """Queue `records` for the sender (fast: a hard crash loses what is queued)."""
        self._enqueue(records)

    def log_durable(self, records: list[Record]) -> Future[None]:
        """Queue `records`; the future completes once every one is acknowledged by Kafka
        or written to the spool (fsynced unless FLYWHEEL_SPOOL_FSYNC=false), and fails
        with `NotDurable` if the sender could do neither. Records the full queue sends to
        the spool are stored before this returns. Never blocks on the sender."""
        future: Future[None] = Future()
        if not self._enqueue(records, future):  # all spooled in the request path: stored
            future.set_result(None)
        return future

    def log_durable_async(self, records: list[Record]) -> asyncio.Future[None]:
        """`log_durable` for the running event loop: an asyncio future it can await,
        completed on that loop (one wake-up per sender batch for all its requests)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._enqueue(records, future):
            future.set_result(None)
        return future

    def spool_directly(self, records: list[Record]) -> None:
        """Append `records` to the spool now (fsynced as the spool is set): what a request
        does when Kafka's acknowledgement is late. The sender may send them too: a
        duplicate by id, which the store skips (delivery is at-least-once)."""
        self.spool.append(records)
        self.stats.spooled += len(records)
        self.stats.direct_spooled += len(records)

    def _enqueue(self, records: list[Record], future: Waiter | None = None) -> bool:
        """Put `records` on the queue in order, the rest in the spool once it is full;
        with `future`, register it on the last queued record's position. Whether any
        record was queued."""
        queued = 0
        with self._seq_lock:
            first = self._enqueued + 1
            for record in records:
                try:
                    self._queue.put_nowait(record)
                except queue.Full:
                    break
                queued += 1
            self._enqueued += queued
            if future is not None and queued:
                self._waiters.append((first, self._enqueued, future))
        if future is not None and queued:
            self._wake.set()  # a fast batch's linger must not hold a waiting request
        if queued < len(records):
            rest = records[queued:]
            self.spool.append(rest)
            self.stats.overflow += len(rest)
            self.stats.spooled += len(rest)
        return queued > 0

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> EventLog:
        self._thread.start()
        return self

    def close(self, timeout_s: float | None = None) -> None:
        """Deliver or spool everything queued, then stop. Nothing stays only in memory."""
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started (a never-started log just spools)
            self._thread.join(timeout_s if timeout_s is not None else self._timeout_s * 3)
        leftover = self._drain(limit=None)
        if leftover:  # the thread did not finish in time: keep them on disk
            self._settle(len(leftover), self._spool_safely(leftover))
        self._fail_waiters("the event log closed")
        self._disconnect()
        self.spool.close()

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """True once the queue is empty, nothing is in flight and the spool is empty."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0 and self.spool.pending == 0:
                return True
            time.sleep(0.02)
        return False

    # -- sender thread ------------------------------------------------------------------
    def _drain(self, limit: int | None, wait_s: float = 0.0) -> list[Record]:
        """Wait up to `wait_s` for a first record, linger so more can join, take the rest.

        Lingering makes batches instead of one Kafka round trip per request, and keeps the
        sender from waking (and taking the GIL from the request loop) on every record.
        """
        batch: list[Record] = []
        try:
            if wait_s:
                batch.append(self._queue.get(timeout=wait_s))
                if self._waiters:  # a request waits for this batch: group commit
                    self._gather(limit)
                elif self._linger_s and (limit is None or self._queue.qsize() < limit):
                    self._linger(limit)
            while limit is None or len(batch) < limit:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return batch

    def _linger(self, limit: int | None) -> None:
        """Wait `linger_s` for fast records to join the batch, but end at once when a
        durable request queues a record (or the log closes): lingering 50 ms behind a
        fast record made a durable answer wait those 50 ms: durable requests/s beside
        one fast record every 5 ms were 0.55x those alone, p99 ~57 ms; 0.85-0.95x with
        this (`python -m bench._mixed_linger`, docs/benchmarks.md)."""
        self._wake.clear()
        if not (self._waiters or self._stop.is_set()):  # either may precede the clear
            self._wake.wait(self._linger_s)
        if self._waiters:  # a request waits on this batch now: group commit
            self._gather(limit)

    def _gather(self, limit: int | None) -> None:
        """Linger for requests that wait on this batch only while more keep arriving:
        up to `durable_linger_s`, but no longer than one `GATHER_STEP_S` without a new
        record. Once the request loop has nothing more to add (every client is waiting
        on this flush), waiting longer would only leave the server idle."""
        if not self._durable_linger_s:
            return
        deadline = time.monotonic() + self._durable_linger_s
        seen = self._queue.qsize()
        while (limit is None or seen < limit) and not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(GATHER_STEP_S, left))
            now = self._queue.qsize()
            if now == seen:
                return
            seen = now

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            batch = self._drain(self._batch_size, wait_s=0 if stopping else 0.05)
            handled = not batch
            try:
                if self.spool.pending:
                    if batch:
                        self.spool.append(batch)
                        self.stats.spooled += len(batch)
                        handled = True
                        self._settle(len(batch), True)  # before a replay that may take long
                    if time.monotonic() >= self._next_retry or stopping:
                        self._replay()
                elif batch:
                    self._deliver(batch)
                    handled = True
                    self._settle(len(batch), True)
                elif not self.connected and not stopping and time.monotonic() >= self._next_retry:
                    self._probe()
            except Exception:  # never let the sender die, never drop: a duplicate beats a loss
                log.exception("event log sender error")
                if not handled:
                    self._settle(len(batch), self._spool_safely(batch))
                time.sleep(self._retry_s)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stopping and (self._queue.empty() or self.spool.pending):
                if self.spool.pending and self.connected:
                    continue  # broker is up: finish replaying before we stop
                return

    def _send(self, records: list[Record]) -> list[bool]:
        try:
            if self._sink is None:
                self._sink = self._sink_factory()
            outcome = self._sink.send(records, self._timeout_s)
        except Exception as exc:
            log.warning("Kafka unavailable (%s): spooling %d record(s)", exc, len(records))
            outcome = [False] * len(records)
        if not all(outcome):
            self.stats.send_failures += 1
            self._disconnect()
        else:
            if not self.connected:
                outage_over()  # the one line that ends a logged outage (flywheel.chatter)
            self.connected = True
        return outcome

    def _probe(self) -> None:
        """Idle and not connected: ask the broker for metadata, so that /readyz reports the
        connection once it is made, not on the first prediction (issue 29). A sink without
        `ping` (a test's) is left alone; a failed probe waits `retry_s` for the next."""
        try:
            if self._sink is None:
                self._sink = self._sink_factory()
            ping = getattr(self._sink, "ping", None)
            if ping is None:
                return
            ping(min(self._timeout_s, 2.0))
        except Exception as exc:
            log.debug("Kafka not reachable yet: %s", exc)
            self._next_retry = time.monotonic() + self._retry_s
            return
        outage_over()
        self.connected = True

    def _disconnect(self) -> None:
        """Drop the producer: a fresh one re-reads metadata and gets a new producer id."""
        self.connected = False
        self._next_retry = time.monotonic() + self._retry_s
        sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.close()
            except Exception as exc:
                log.debug("closing the sink failed: %s", exc)

    def _spool_safely(self, records: list[Record]) -> bool:
        try:
            self.spool.append(records)
            self.stats.spooled += len(records)
        except Exception:
            log.exception("could not spool %d record(s)", len(records))
            return False
        return True

    def _settle(self, n: int, stored: bool) -> None:
        """The next `n` queued records are handled (`stored`: acknowledged or spooled):
        complete the future of every request whose records are all handled now."""
        with self._seq_lock:
            first = self._handled + 1
            self._handled += n
            if not stored:
                self._lost.append((first, self._handled))
            done = []
            while self._waiters and self._waiters[0][1] <= self._handled:
                done.append(self._waiters.popleft())
            lost = self._lost
            oldest = self._waiters[0][0] if self._waiters else self._handled + 1
            self._lost = [span for span in lost if span[1] >= oldest]
        if done:
            _finish(
                [
                    (
                        future,
                        NotDurable("the sender could neither deliver nor spool them")
                        if any(a <= hi and b >= lo for a, b in lost)
                        else None,
                    )
                    for lo, hi, future in done
                ]
            )

    def _fail_waiters(self, why: str) -> None:
        with self._seq_lock:
            waiting, self._waiters = list(self._waiters), deque()
        _finish([(future, NotDurable(why)) for _, _, future in waiting])

    def _deliver(self, batch: list[Record]) -> None:
        self.stats.batches += 1
        outcome = self._send(batch)
        failed = [r for r, ok in zip(batch, outcome, strict=True) if not ok]
        self.stats.delivered += len(batch) - len(failed)
        if failed:
            self.spool.append(failed)
            self.stats.spooled += len(failed)

    def _replay(self) -> None:
        while self.spool.pending:
            records, end = self.spool.peek(self._batch_size)
            if not records:
                return
            if not all(self._send(records)):
                return  # retried after retry_s; the checkpoint has not moved
            # counted before the spool shrinks: whoever sees it empty (`wait_idle`, a
            # metrics scrape) must also see the records it held as replayed
            self.stats.replayed += len(records)
            self.spool.commit(end, len(records))
            log.info("replayed %d spooled record(s), %d left", len(records), self.spool.pending)


Waiter = Future[None] | asyncio.Future[None]
Outcome = tuple[Waiter, BaseException | None]


def _finish(outcomes: list[Outcome]) -> None:
    """Complete waiters from the sender thread: a thread's future at once, an event
    loop's futures in that loop, all of one loop's in one `call_soon_threadsafe`."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for future, error in outcomes:
        if isinstance(future, asyncio.Future):
            by_loop.setdefault(future.get_loop(), []).append((future, error))
        else:
            _complete(future, error)
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_complete_all, items)


def _complete_all(outcomes: list[Outcome]) -> None:
    for future, error in outcomes:
        _complete(future, error)


def _complete(future: Waiter, error: BaseException | None) -> None:
    """Set a waiter's outcome; one its caller gave up on (cancelled) is left alone."""
    if future.done():
        return
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except (InvalidStateError, asyncio.InvalidStateError):
        pass
