"""Logging to Kafka off the request path, with nothing lost when the broker is down.

Requests put records on a bounded queue; one sender thread batches them to Kafka with
acks=all. A record Kafka does not acknowledge in time goes to the spool, and while the
spool holds anything, new records queue behind it there, so replay keeps their order.
If the queue is full the request path appends to the spool itself instead of blocking
or dropping. Delivery is at-least-once, keyed by id.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from flywheel.service.spool import Record, Spool

log = logging.getLogger(__name__)


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
    ) -> None:
        self._sink_factory = sink_factory
        self._sink: Sink | None = None
        self.spool = spool
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._timeout_s = send_timeout_s
        self._retry_s = retry_s
        self._linger_s = linger_s
        self._next_retry = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flywheel-event-log", daemon=True)
        self.stats = EventLogStats()
        self.connected = False

    # -- request path -------------------------------------------------------------------
    def log(self, topic: str, key: str, value: bytes) -> None:
        record = Record(topic, key.encode(), value)
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.spool.append([record])
            self.stats.overflow += 1
            self.stats.spooled += 1

    def log_many(self, records: list[Record]) -> None:
        for i, record in enumerate(records):
            try:
                self._queue.put_nowait(record)
            except queue.Full:
                rest = records[i:]
                self.spool.append(rest)
                self.stats.overflow += len(rest)
                self.stats.spooled += len(rest)
                return

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
        self._thread.join(timeout_s if timeout_s is not None else self._timeout_s * 3)
        leftover = self._drain(limit=None)
        if leftover:  # the thread did not finish in time: keep them on disk
            self.spool.append(leftover)
            self.stats.spooled += len(leftover)
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
                if self._linger_s and (limit is None or self._queue.qsize() < limit):
                    self._stop.wait(self._linger_s)
            while limit is None or len(batch) < limit:
                batch.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return batch

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
                    if time.monotonic() >= self._next_retry or stopping:
                        self._replay()
                elif batch:
                    self._deliver(batch)
                    handled = True
            except Exception:  # never let the sender die, never drop: a duplicate beats a loss
                log.exception("event log sender error")
                if not handled:
                    self._spool_safely(batch)
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
            self.connected = True
        return outcome

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

    def _spool_safely(self, records: list[Record]) -> None:
        try:
            self.spool.append(records)
            self.stats.spooled += len(records)
        except Exception:
            log.exception("could not spool %d record(s)", len(records))

    def _deliver(self, batch: list[Record]) -> None:
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
