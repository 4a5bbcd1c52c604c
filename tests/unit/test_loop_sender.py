"""The loop sender (`EventLog(loop_sink_factory=...)`): durable records produced from the
event loop, their delivery reports served on the loop. Fake producers: a future
completes only once its records are acknowledged or spooled, a refused record is spooled
before its request is answered and later requests go through the thread sender behind
the spool, a failing disk fails the future, close spools what is unacknowledged, and a
full producer hands the request to the thread sender."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from flywheel.service.event_log import EventLog, NotDurable
from flywheel.service.spool import Record, Spool

WAIT_S = 30.0


class ThreadSink:
    """The thread sender's sink: acknowledges every batch; remembers the keys."""

    def __init__(self, s: dict) -> None:
        self.s = s

    def send(self, records, timeout_s):
        with self.s["lock"]:
            self.s["thread"].extend(r.key.decode() for r in records)
        return [True] * len(records)

    def close(self):
        pass


class LoopSink:
    """A producer whose reports come out of `poll()` once `gate` is set, as acks (`up`)
    or refusals; `abort()` reports everything held as failed, as librdkafka's purge."""

    def __init__(self, s: dict) -> None:
        self.s = s
        self.held: list[tuple[Record, object]] = []
        self.purged = False

    def produce(self, record, on_delivery):
        if self.s["full"]:
            raise BufferError("Local: Queue full")
        with self.s["lock"]:
            self.held.append((record, on_delivery))
            self.s["produced_on"].add(threading.current_thread().name)

    def poll(self, timeout_s):
        if not (self.s["gate"].is_set() or self.purged):
            time.sleep(min(timeout_s, 0.001))
            return 0
        with self.s["lock"]:
            held, self.held = self.held, []
        for record, callback in held:
            ok = self.s["up"] and not self.purged
            if ok:
                self.s["loop"].append(record.key.decode())
            callback(None if ok else "refused", None)
        return len(held)

    def in_flight(self):
        return len(self.held)

    def abort(self):
        self.purged = True

    def close(self):
        self.s["closed"] += 1


class BrokenSpool(Spool):
    broken = False

    def append(self, records):
        if self.broken:
            raise OSError(28, "No space left on device")
        super().append(records)


def shared(up=True, open_gate=True) -> dict:
    s = {
        "up": up,
        "full": False,
        "thread": [],
        "loop": [],
        "closed": 0,
        "produced_on": set(),
        "lock": threading.Lock(),
        "gate": threading.Event(),
    }
    if open_gate:
        s["gate"].set()
    return s


def make_log(tmp_path, s, spool=None) -> EventLog:
    log = EventLog(
        lambda: ThreadSink(s),
        spool or Spool(tmp_path / "spool", fsync=False),
        send_timeout_s=0.2,
        retry_s=0.05,
        loop_sink_factory=lambda: LoopSink(s),
    ).start()
    log.log_durable([Record("t", b"warm", b"{}")]).result(WAIT_S)  # connected now
    deadline = time.monotonic() + WAIT_S
    while not log.loop_producing and time.monotonic() < deadline:
        time.sleep(0.005)
    assert log.loop_producing
    return log


def records(prefix: str, n: int) -> list[Record]:
    return [Record("t", f"{prefix}-{i}".encode(), b"{}") for i in range(n)]


def test_records_are_produced_on_the_loop_and_answered_only_once_acknowledged(tmp_path):
    s = shared(open_gate=False)
    log = make_log(tmp_path, s)

    async def run() -> list[str]:
        future = log.log_durable_async(records("a", 3))
        await asyncio.sleep(0.05)  # several pumps: nothing acknowledged, nothing answered
        assert not future.done()
        s["gate"].set()
        await asyncio.wait_for(future, WAIT_S)
        return list(s["loop"])

    seen = asyncio.run(run())
    assert seen == ["a-0", "a-1", "a-2"]  # all acknowledged when the request resumed
    assert s["thread"] == ["warm"]  # not through the sender thread
    assert s["produced_on"] == {threading.main_thread().name}  # produced on the loop
    assert log.wait_idle(WAIT_S)
    log.close()


def test_concurrent_requests_are_all_answered_once_their_records_are_acked(tmp_path):
    s = shared(open_gate=False)
    log = make_log(tmp_path, s)

    async def run() -> list[tuple[int, set[str]]]:
        seen: list[tuple[int, set[str]]] = []

        async def request(k: int) -> None:
            await log.log_durable_async(records(f"c{k}", 2))
            seen.append((k, set(s["loop"])))

        tasks = [asyncio.create_task(request(k)) for k in range(12)]
        await asyncio.sleep(0.01)
        s["gate"].set()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        return seen

    seen = asyncio.run(run())
    log.close()
    assert sorted(k for k, _ in seen) == list(range(12))
    for k, delivered in seen:
        assert {f"c{k}-0", f"c{k}-1"} <= delivered


def test_a_refused_record_is_spooled_before_the_answer_and_replayed_in_order(tmp_path):
    s = shared(up=False, open_gate=False)
    log = make_log(tmp_path, s)

    async def run() -> tuple[int, int]:
        future = log.log_durable_async(records("refused", 2))
        s["gate"].set()
        await asyncio.wait_for(future, WAIT_S)
        pending_at_answer = log.spool.pending
        # the spool is not empty: the next request queues behind it (thread sender)
        await asyncio.wait_for(log.log_durable_async(records("next", 1)), WAIT_S)
        return pending_at_answer, log.stats.send_failures

    pending_at_answer, failures = asyncio.run(run())
    assert pending_at_answer >= 2 and failures >= 1
    assert log.wait_idle(WAIT_S)  # the thread sender replays the spool
    assert s["loop"] == []
    assert s["thread"] == ["warm", "refused-0", "refused-1", "next-0"]
    assert s["closed"] >= 1  # the refusing producer was dropped
    log.close()


def test_a_refused_record_the_disk_cannot_take_fails_the_future(tmp_path):
    s = shared(up=False, open_gate=False)
    spool = BrokenSpool(tmp_path / "spool", fsync=False)
    log = make_log(tmp_path, s, spool=spool)
    spool.broken = True

    async def run() -> None:
        future = log.log_durable_async(records("lost", 1))
        s["gate"].set()
        await asyncio.wait_for(future, WAIT_S)

    with pytest.raises(NotDurable):
        asyncio.run(run())
    spool.broken = False
    log.close()


def test_close_spools_what_was_never_acknowledged(tmp_path):
    """Kafka never answers the loop's producer: close purges it, the purge reports
    spool the records, the request is answered, and the closing thread sender replays
    the spool to its own (working) producer before it stops."""
    s = shared(open_gate=False)  # Kafka never answers
    log = make_log(tmp_path, s)
    outcome: list[BaseException | None] = []

    async def run() -> None:
        future = log.log_durable_async(records("held", 3))
        await asyncio.sleep(0.01)
        # close from another thread while the request waits, as a shutdown would
        await asyncio.to_thread(log.close, 0.1)
        await asyncio.sleep(0.01)
        outcome.append(future.exception() if future.done() else None)
        assert future.done()

    asyncio.run(run())
    assert outcome == [None]  # stored: spooled, then replayed by the closing sender thread
    assert s["loop"] == [] and s["thread"] == ["warm", "held-0", "held-1", "held-2"]


def test_a_full_producer_hands_the_request_to_the_thread_sender(tmp_path):
    s = shared()
    log = make_log(tmp_path, s)
    s["full"] = True

    async def run() -> None:
        await asyncio.wait_for(log.log_durable_async(records("full", 2)), WAIT_S)

    asyncio.run(run())
    assert s["thread"] == ["warm", "full-0", "full-1"] and s["loop"] == []
    log.close()
