import threading
import time

from flywheel.service.event_log import EventLog
from flywheel.service.spool import Record, Spool


class FakeSink:
    """Records what it 'delivers'; `up` switches it between working and failing."""

    def __init__(self, state):
        self.state = state

    def send(self, records, timeout_s):
        with self.state["lock"]:
            if not self.state["up"]:
                return [False] * len(records)
            self.state["delivered"].extend(r.key.decode() for r in records)
            return [True] * len(records)

    def close(self):
        self.state["closed"] += 1


def make(tmp_path, up=True, **kw):
    state = {"up": up, "delivered": [], "lock": threading.Lock(), "closed": 0}
    log = EventLog(
        lambda: FakeSink(state),
        Spool(tmp_path / "spool", fsync=False),
        send_timeout_s=0.2,
        retry_s=0.05,
        **kw,
    )
    return log, state


def test_delivers_everything_in_order(tmp_path):
    log, state = make(tmp_path)
    log.start()
    for i in range(1000):
        log.log("t", f"{i}", b"{}")
    assert log.wait_idle(10)
    log.close()
    assert state["delivered"] == [str(i) for i in range(1000)]
    assert log.stats.delivered == 1000 and log.spool.pending == 0


def test_outage_spools_then_replays_in_order(tmp_path):
    log, state = make(tmp_path, up=False)
    log.start()
    for i in range(300):
        log.log("t", f"{i}", b"{}")
    deadline = time.monotonic() + 5
    while log.spool.pending < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.spool.pending == 300 and state["delivered"] == []
    state["up"] = True
    for i in range(300, 400):  # records logged during recovery queue behind the spool
        log.log("t", f"{i}", b"{}")
    assert log.wait_idle(10)
    log.close()
    assert state["delivered"] == [str(i) for i in range(400)]
    assert log.stats.replayed >= 300


def test_full_queue_spills_to_spool_instead_of_dropping(tmp_path):
    log, state = make(tmp_path, queue_size=10)  # not started: the queue fills up
    for i in range(25):
        log.log("t", f"{i}", b"{}")
    assert log.queue_depth == 10 and log.spool.pending == 15 and log.stats.overflow == 15
    log.start()
    assert log.wait_idle(10)
    log.close()
    assert sorted(state["delivered"], key=int) == [str(i) for i in range(25)]
    assert len(state["delivered"]) == 25


def test_close_while_broker_down_keeps_everything_on_disk(tmp_path):
    log, state = make(tmp_path, up=False)
    log.start()
    log.log_many([Record("t", f"{i}".encode(), b"{}") for i in range(50)])
    log.close(timeout_s=5)
    assert log.spool.pending == 50
    # a new process with the same spool replays once the broker is back
    state2 = {"up": True, "delivered": [], "lock": threading.Lock(), "closed": 0}
    log2 = EventLog(
        lambda: FakeSink(state2),
        Spool(tmp_path / "spool", fsync=False),
        send_timeout_s=0.2,
        retry_s=0.05,
    )
    log2.start()
    assert log2.wait_idle(10)
    log2.close()
    assert state2["delivered"] == [str(i) for i in range(50)]


def test_sink_factory_failure_is_an_outage_not_a_crash(tmp_path):
    calls = {"n": 0}
    state = {"up": True, "delivered": [], "lock": threading.Lock(), "closed": 0}

    def factory():
        calls["n"] += 1
        if calls["n"] < 3:
            raise OSError("no brokers")
        return FakeSink(state)

    log = EventLog(
        factory, Spool(tmp_path / "spool", fsync=False), send_timeout_s=0.2, retry_s=0.05
    )
    log.start()
    log.log("t", "a", b"{}")
    log.log("t", "b", b"{}")
    assert log.wait_idle(10)
    log.close()
    assert state["delivered"] == ["a", "b"] and calls["n"] >= 3


class ExplodingCloseSink(FakeSink):
    def close(self):
        raise TimeoutError("Timeout waiting for future")  # what kafka-python's close can do


def test_a_failing_close_does_not_lose_the_failed_batch(tmp_path):
    state = {"up": False, "delivered": [], "lock": threading.Lock(), "closed": 0}
    log = EventLog(
        lambda: ExplodingCloseSink(state),
        Spool(tmp_path / "spool", fsync=False),
        send_timeout_s=0.2,
        retry_s=0.05,
    )
    log.start()
    log.log_many([Record("t", f"{i}".encode(), b"{}") for i in range(7)])
    deadline = time.monotonic() + 5
    while log.spool.pending < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.spool.pending == 7
    state["up"] = True
    assert log.wait_idle(10)
    log.close()
    assert state["delivered"] == [str(i) for i in range(7)]
