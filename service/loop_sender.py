"""Durable records produced from the event loop itself (issue 27, a candidate).

The event log's thread sender answers a durable request after three hand-offs a batch:
the request loop wakes the sender thread, the sender gathers and produces, and its
flush returns and wakes the loop. Here the request coroutine calls the producer's
`produce()` on the loop thread (a C call that queues the record for librdkafka's own
threads), and one poller thread serves librdkafka's delivery reports: after each
`poll()` it spools what Kafka refused (fsynced), then wakes every request whose records
are all settled with one `call_soon_threadsafe` per loop. librdkafka's `linger.ms`
does the gathering.

Guarantees as the thread sender's: a request's future completes only once each of its
records is acknowledged (acks=all) or in the spool; a refused record is spooled and the
producer dropped (what it still held is purged, reported failed and spooled too), after
which requests go through the thread sender, which replays the spool in order, until
the spool is empty again. A future whose records could be neither acknowledged nor
spooled fails with `NotDurable`, and the request spools them itself.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

from flywheel.service.spool import Record

if TYPE_CHECKING:
    from flywheel.service.event_log import EventLogStats, Outcome, Waiter

__all__ = ["AsyncSink", "LoopSender"]

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often the thread looks whether a producer must be made; its drain step
PUMP_S = 0.001  # the loop serves delivery reports this often while requests wait (uvloop
# timers have 1 ms resolution: anything shorter turns into a busy loop)
DRAIN_S = 1.0  # how long a dropped producer is polled for the reports of its purge


class AsyncSink(Protocol):
    """A producer that takes one record at a time and reports each delivery through
    `on_delivery(err, msg)` (err None: acknowledged) from inside `poll()`."""

    def produce(self, record: Record, on_delivery: Callable[[object, object], None]) -> None: ...
    def poll(self, timeout_s: float) -> int: ...
    def in_flight(self) -> int: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


class _Request:
    """One request's records in flight: settled once every one is reported."""

    __slots__ = ("failed", "future", "left", "records", "sink")

    def __init__(self, future: Waiter | None, records: list[Record], sink: AsyncSink) -> None:
        self.future = future
        self.records = records
        self.sink = sink
        self.left = len(records)
        self.failed: list[Record] = []


class LoopSender:
    """Produces on the caller's (event loop) thread, and serves delivery reports there
    too: after each produce and on a `PUMP_S` timer while requests wait. A thread only
    makes (and remakes) the producer and drains it at close."""

    def __init__(
        self,
        sink_factory: Callable[[], AsyncSink],
        spool: Callable[[list[Record]], None],
        stats: EventLogStats,
        finish: Callable[[list[Outcome]], None],
        not_durable: Callable[[str], BaseException],
        *,
        retry_s: float = 1.0,
    ) -> None:
        self._factory = sink_factory
        self._spool = spool
        self._stats = stats
        self._finish = finish
        self._not_durable = not_durable
        self._retry_s = retry_s
        self._retry_at = 0.0
        self._sink: AsyncSink | None = None
        self._stop = threading.Event()
        self._close_timeout_s = DRAIN_S
        self._lock = threading.RLock()
        self._outstanding: set[_Request] = set()
        self._ready: list[_Request] = []
        self._pumps: set[asyncio.AbstractEventLoop] = set()  # loops with a pump armed
        self._thread = threading.Thread(target=self._run, name="flywheel-loop-sender", daemon=True)

    @property
    def available(self) -> bool:
        return self._sink is not None and not self._stop.is_set()

    @property
    def in_flight(self) -> int:
        """Requests produced and not yet settled."""
        return len(self._outstanding)

    def start(self) -> LoopSender:
        self._thread.start()
        return self

    def submit(self, records: list[Record], future: asyncio.Future[None]) -> bool:
        """Produce `records` now, on the running loop; `future` completes once all are
        stored. False (nothing owed to `future`) if this sender cannot take them: the
        caller queues them for the thread sender."""
        sink = self._sink
        if sink is None or self._stop.is_set():
            return False
        request = _Request(future, records, sink)
        with self._lock:
            self._outstanding.add(request)
        produced = 0
        try:
            for record in records:
                sink.produce(record, partial(self._delivered, request, record))
                produced += 1
        except Exception as exc:  # BufferError, KafkaException: the thread sender takes them
            log.debug("loop produce failed (%s): queueing %d record(s)", exc, len(records))
            # the records produced so far may still be delivered: a duplicate by id at
            # worst (at-least-once); the request no longer waits on them
            with self._lock:
                request.future = None
                request.left -= len(records) - produced
                if request.left == 0:
                    self._outstanding.discard(request)
            return False
        self._serve(sink)  # reports that came in while the loop was busy: no wait, no thread
        loop = future.get_loop()
        if loop not in self._pumps:
            self._pumps.add(loop)
            loop.call_later(PUMP_S, self._pump, loop)
        return True

    def close(self, timeout_s: float) -> None:
        """Stop taking records; wait up to `timeout_s` for the reports of those in flight,
        then purge the rest (reported failed, so spooled) and stop the thread."""
        self._close_timeout_s = timeout_s
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s + DRAIN_S + 1.0)

    # -- delivery reports ---------------------------------------------------------------
    def _delivered(self, request: _Request, record: Record, err: object, _msg: object) -> None:
        """librdkafka's delivery report, run inside `poll()`."""
        with self._lock:
            if err is not None:
                request.failed.append(record)
            request.left -= 1
            if request.left == 0:
                self._ready.append(request)

    def _pump(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the loop, every PUMP_S while any request waits: serve delivery reports."""
        self._pumps.discard(loop)
        sink = self._sink
        if sink is not None:
            self._serve(sink)
        if self._outstanding and not loop.is_closed():
            self._pumps.add(loop)
            loop.call_later(PUMP_S, self._pump, loop)

    def _serve(self, sink: AsyncSink) -> None:
        try:
            sink.poll(0)
        except Exception:
            log.exception("loop producer poll failed")
            self._drop(sink)
            return
        self._settle()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sink is None and time.monotonic() >= self._retry_at:
                try:
                    self._sink = self._factory()
                except Exception as exc:
                    log.warning("loop producer unavailable (%s); retrying", exc)
                    self._retry_at = time.monotonic() + self._retry_s
            self._stop.wait(POLL_S)
        sink = self._sink
        if sink is None:
            return
        deadline = time.monotonic() + self._close_timeout_s
        while self._outstanding and time.monotonic() < deadline:
            sink.poll(POLL_S)
            self._settle()
        self._drop(sink)

    def _settle(self, drop: bool = True) -> None:
        """Spool what Kafka refused, then complete every settled request; after a refusal
        drop the producer (`drop`)."""
        with self._lock:
            ready, self._ready = self._ready, []
            if not ready:
                return
            failed = [record for request in ready for record in request.failed]
            error: BaseException | None = None
            if failed:
                self._stats.send_failures += 1
                try:
                    self._spool(failed)  # fsynced (as the spool is set) before any answer
                except Exception as exc:
                    log.exception("could not spool %d refused record(s)", len(failed))
                    error = self._not_durable(f"neither delivered nor spooled ({exc})")
            outcomes: list[Outcome] = []
            delivered = 0
            for request in ready:
                self._outstanding.discard(request)
                delivered += len(request.records) - len(request.failed)
                if request.future is not None:
                    outcomes.append((request.future, error if request.failed else None))
            self._stats.delivered += delivered
        if outcomes:
            self._stats.batches += 1
            self._finish(outcomes)
        if failed and drop:
            self._drop(ready[0].sink)

    def _drop(self, sink: AsyncSink) -> None:
        """Drop the producer: purge what it holds (reported failed, hence spooled), and
        fail the requests whose reports never came (they spool their records)."""
        with self._lock:
            if self._sink is sink:
                self._sink = None
                self._retry_at = time.monotonic() + self._retry_s
        try:
            sink.abort()
            deadline = time.monotonic() + DRAIN_S
            while sink.in_flight() and time.monotonic() < deadline:
                sink.poll(0.01)
        except Exception as exc:
            log.debug("draining the dropped loop producer: %s", exc)
        self._settle(drop=False)
        with self._lock:
            orphans = [r for r in self._outstanding if r.sink is sink]
            self._outstanding.difference_update(orphans)
        self._finish(
            [
                (r.future, self._not_durable("the producer was dropped before its report"))
                for r in orphans
                if r.future is not None
            ]
        )
        try:
            sink.close()
        except Exception as exc:
            log.debug("closing the loop producer: %s", exc)
