"""Group commit in the event log (`EventLog.log_durable`) and the durable answer of the
HTTP routes, with fake sinks: a future completes only once its records are acknowledged
or spooled, concurrent requests share one flush or fsync, a late acknowledgement makes
the request spool its records itself, and a failing disk is a 503, never a 202."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import wait

import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.service.event_log import EventLog, NotDurable
from flywheel.service.spool import Record, Spool
from flywheel.settings import Settings

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
WAIT_S = 30.0  # a bound for a future that must complete; none should come near it


class GatedSink:
    """Acknowledges (or refuses, while `up` is False) a batch once `gate` is set; counts
    its sends. Keys reach `delivered` before the send returns, as Kafka's would."""

    def __init__(self, shared: dict) -> None:
        self.shared = shared

    def send(self, records, timeout_s):
        s = self.shared
        s["gate"].wait(WAIT_S)
        with s["lock"]:
            s["sends"] += 1
            if not s["up"]:
                return [False] * len(records)
            s["delivered"].extend(r.key.decode() for r in records)
            return [True] * len(records)

    def close(self):
        pass


class BrokenSpool(Spool):
    """A spool whose disk refuses every write once `broken` is set."""

    broken = False

    def append(self, records):
        if self.broken:
            raise OSError(28, "No space left on device")
        super().append(records)


def shared(up=True, open_gate=True):
    s = {"up": up, "delivered": [], "sends": 0, "lock": threading.Lock()}
    s["gate"] = threading.Event()
    if open_gate:
        s["gate"].set()
    return s


def make_log(tmp_path, s, *, spool=None, **kw):
    return EventLog(
        lambda: GatedSink(s),
        spool or Spool(tmp_path / "spool", fsync=False),
        send_timeout_s=0.2,
        retry_s=0.05,
        **kw,
    )


def records(prefix: str, n: int) -> list[Record]:
    return [Record("t", f"{prefix}-{i}".encode(), b"{}") for i in range(n)]


def test_a_future_completes_only_once_its_records_are_acknowledged(tmp_path):
    s = shared(open_gate=False)
    log = make_log(tmp_path, s).start()
    future = log.log_durable(records("a", 3))
    assert not future.done()  # queued, and Kafka has not answered: not stored yet
    seen_at_completion: list[list[str]] = []
    future.add_done_callback(lambda _: seen_at_completion.append(list(s["delivered"])))
    s["gate"].set()
    future.result(WAIT_S)
    assert seen_at_completion == [["a-0", "a-1", "a-2"]]
    log.close()


def test_concurrent_requests_share_one_flush(tmp_path):
    """Twenty requests queued while one send is in flight wait on the next send together
    (group commit), not on one send each, and each learns of its own records only."""
    s = shared(open_gate=False)
    log = make_log(tmp_path, s).start()
    first = log.log_durable(records("first", 1))
    futures = [log.log_durable(records(f"r{k}", 2)) for k in range(20)]
    s["gate"].set()
    done, pending = wait([first, *futures], WAIT_S)
    assert not pending and all(f.exception() is None for f in done)
    assert s["sends"] <= 3, s["sends"]  # the first batch, then all twenty together
    assert sorted(s["delivered"]) == sorted(
        ["first-0"] + [f"r{k}-{i}" for k in range(20) for i in range(2)]
    )
    log.close()


def test_a_durable_request_does_not_wait_for_the_linger(tmp_path):
    """A 30 s linger would hold a fast batch that long; a waiting request is sent at once."""
    s = shared()
    log = make_log(tmp_path, s, linger_s=30.0).start()
    log.log_durable(records("now", 2)).result(WAIT_S / 3)
    assert s["delivered"] == ["now-0", "now-1"]
    log.close(timeout_s=5)


def test_a_durable_request_behind_a_lingering_fast_record_is_sent_at_once(tmp_path):
    """A fast record (`log_many`) starts the sender's linger (30 s here, 50 ms by
    default); a durable request queued during it ends the linger: its future completes
    in well under the linger, with the fast record in the same send."""
    s = shared()
    log = make_log(tmp_path, s, linger_s=30.0).start()
    log.log_many(records("fast", 1))
    deadline = time.monotonic() + WAIT_S
    while log.queue_depth and time.monotonic() < deadline:  # the sender took it ...
        time.sleep(0.001)
    time.sleep(0.2)  # ... and lingers now
    assert s["sends"] == 0
    started = time.monotonic()
    log.log_durable(records("durable", 1)).result(5.0)  # raises TimeoutError if it lingers
    assert time.monotonic() - started < 5.0
    assert s["delivered"] == ["fast-0", "durable-0"] and s["sends"] == 1
    log.close(timeout_s=5)


def test_with_kafka_down_a_future_completes_once_the_records_are_fsynced(tmp_path, monkeypatch):
    """The failed send spools the batch (fsynced) before the future completes; later
    requests, queued while that send was in flight, share one fsync."""
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    s = shared(up=False, open_gate=False)
    log = make_log(tmp_path, s, spool=Spool(tmp_path / "spool", fsync=True)).start()
    first = log.log_durable(records("first", 1))
    futures = [log.log_durable(records(f"r{k}", 2)) for k in range(20)]
    pending_at_completion: list[int] = []
    first.add_done_callback(lambda _: pending_at_completion.append(log.spool.pending))
    s["gate"].set()
    done, pending = wait([first, *futures], WAIT_S)
    assert not pending and all(f.exception() is None for f in done)
    assert pending_at_completion and pending_at_completion[0] >= 1
    assert log.spool.pending >= 41 and s["delivered"] == []
    assert 1 <= len(fsyncs) < 21, fsyncs  # shared, not one fsync a request
    log.close(timeout_s=5)


def test_a_batch_that_can_be_neither_sent_nor_spooled_fails_its_futures(tmp_path):
    s = shared(up=False)
    spool = BrokenSpool(tmp_path / "spool", fsync=False)
    spool.broken = True
    log = make_log(tmp_path, s, spool=spool).start()
    future = log.log_durable(records("lost", 2))
    with pytest.raises(NotDurable):
        future.result(WAIT_S)
    spool.broken = False
    s["up"] = True  # the disk and Kafka recover: later requests are stored again
    log.log_durable(records("later", 1)).result(WAIT_S)
    assert "later-0" in s["delivered"]
    log.close(timeout_s=5)


def test_close_spools_what_is_still_queued_and_completes_its_futures(tmp_path):
    s = shared()
    log = make_log(tmp_path, s)  # never started: nothing is sent
    future = log.log_durable(records("q", 4))
    log.close(timeout_s=1)
    future.result(0)
    assert log.spool.pending == 4


def test_a_full_queue_spools_the_rest_in_the_request_path(tmp_path):
    s = shared()
    log = make_log(tmp_path, s, queue_size=2)  # not started: the queue fills up
    future = log.log_durable(records("x", 5))
    assert log.spool.pending == 3 and log.stats.overflow == 3
    assert not future.done()  # the two queued ones are not stored yet
    log.start()
    future.result(WAIT_S)
    assert log.wait_idle(WAIT_S)
    log.close()
    assert sorted(s["delivered"]) == [f"x-{i}" for i in range(5)]


# -- the routes -------------------------------------------------------------------------
@pytest.fixture()
def app_with(tmp_path):
    """`app_with(log, **settings)`: a TestClient of the app on that event log."""
    clients = []

    def make(log: EventLog, **overrides):
        torch.manual_seed(0)
        # keys are another test's concern (test_auth.py): these are about the 202
        settings = Settings(home=tmp_path / "home", **({"auth": "off"} | overrides))
        holder = ModelHolder()
        holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
        client = TestClient(create_app(ServiceConfig.of(settings), holder=holder, event_log=log))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def predict_ids(client, n=2):
    r = client.post("/v1/predict", json={"instances": [[0.1, 0.2, 0.3]] * n})
    assert r.status_code == 200, r.text
    return [p["id"] for p in r.json()["predictions"]]


def correct(client, ids):
    body = {"corrections": [{"prediction_id": pid, "label": "cat"} for pid in ids]}
    return client.post("/v1/corrections", json=body)


def test_the_202_comes_after_kafka_acknowledged_the_corrections(tmp_path, app_with):
    s = shared()
    log = make_log(tmp_path, s)
    client = app_with(log, prediction_durability="durable")
    ids = predict_ids(client)  # durable predictions: on Kafka already
    assert s["delivered"] == ids
    r = correct(client, ids)
    assert r.status_code == 202 and r.json() == {"accepted": 2}
    assert s["delivered"][2:] == ids  # corrections are keyed by their prediction's id
    assert log.stats.direct_spooled == 0


def test_a_late_acknowledgement_makes_the_request_spool_its_records(tmp_path, app_with):
    """Kafka hangs: after FLYWHEEL_DURABLE_WAIT_MS the request writes its records to the
    spool itself and answers 202; the sender may send them later too (a duplicate by id)."""
    s = shared()
    log = make_log(tmp_path, s)
    client = app_with(log, durable_wait_ms=50, prediction_durability="fast")
    ids = predict_ids(client)
    assert log.wait_idle(WAIT_S)
    s["gate"].clear()  # the next send hangs
    r = correct(client, ids)
    assert r.status_code == 202
    assert log.stats.direct_spooled == 2 and log.spool.pending >= 2
    assert s["delivered"] == ids  # the hung send has delivered nothing
    s["gate"].set()
    assert log.wait_idle(WAIT_S)  # spool replayed: every correction on Kafka, maybe twice
    assert set(s["delivered"][2:]) == set(ids)


def test_a_disk_that_fails_too_is_a_503_with_retry_after(tmp_path, app_with):
    s = shared(up=False)
    spool = BrokenSpool(tmp_path / "spool", fsync=False)
    log = make_log(tmp_path, s, spool=spool)
    client = app_with(log, durable_wait_ms=100, prediction_durability="durable")
    ids = predict_ids(client)  # spooled: Kafka is down, the disk works
    spool.broken = True
    r = correct(client, ids)
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert "could not store the records durably" in r.json()["detail"]
    r = client.post("/v1/predict", json={"instances": [[0.1, 0.2, 0.3]]})
    assert r.status_code == 503  # a durable prediction is refused, not answered unstored
    spool.broken = False
    assert correct(client, ids).status_code == 202


def test_fast_predictions_are_answered_before_kafka_acknowledges(tmp_path, app_with):
    s = shared(open_gate=False)
    log = make_log(tmp_path, s)
    client = app_with(log)  # fast predictions: the default
    ids = predict_ids(client)  # answered while the send hangs
    assert s["delivered"] == []
    s["gate"].set()
    assert log.wait_idle(WAIT_S)
    assert s["delivered"] == ids


def test_concurrent_async_requests_are_woken_together_once_stored(tmp_path):
    """The route's path: coroutines on one event loop await `log_durable_async`; the
    sender completes them on that loop, after their records are acknowledged."""
    import asyncio

    s = shared(open_gate=False)
    log = make_log(tmp_path, s).start()

    async def run() -> list[tuple[int, set[str]]]:
        seen: list[tuple[int, set[str]]] = []

        async def request(k: int) -> None:
            await log.log_durable_async(records(f"c{k}", 2))
            seen.append((k, set(s["delivered"])))  # what Kafka held when this one resumed

        tasks = [asyncio.create_task(request(k)) for k in range(12)]
        await asyncio.sleep(0)  # all twelve queued while the gate holds the sender
        s["gate"].set()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
        return seen

    seen = asyncio.run(run())
    log.close()
    assert sorted(k for k, _ in seen) == list(range(12))
    for k, delivered in seen:
        assert {f"c{k}-0", f"c{k}-1"} <= delivered
    assert s["sends"] <= 2  # the twelve requests shared the sends
