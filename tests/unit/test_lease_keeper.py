"""The learner's side of the lineage lease (learner/lease.py) on a real SQLite store."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from flywheel.learner import LeaseKeeper
from flywheel.store import LeaseLost, make_engine, upgrade


@pytest.fixture()
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'lease.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_a_standby_says_once_who_holds_the_lineage(engine, caplog):
    holder = LeaseKeeper(engine, "m:online", ttl_s=30.0, renew_s=0.05, owner="host:1:a")
    standby = LeaseKeeper(engine, "m:online", ttl_s=30.0, renew_s=0.05, owner="host:2:b")
    assert holder.try_take()
    with caplog.at_level(logging.INFO, logger="flywheel.learner.lease"):
        assert not standby.wait(timeout_s=0.5)  # ~10 tries
    said = [r.getMessage() for r in caplog.records if "is standby" in r.getMessage()]
    assert len(said) == 1
    assert "host:2:b is standby" in said[0] and "held by host:1:a (token 1" in said[0]
    with pytest.raises(LeaseLost):
        standby.fence()
    stop = threading.Event()
    stop.set()
    assert not standby.wait(stop)  # a stop ends the wait


def test_renewal_finds_a_newer_holder_and_says_the_lease_is_lost(engine):
    a = LeaseKeeper(engine, "m:online", ttl_s=1.0, renew_s=0.1, owner="a")
    b = LeaseKeeper(engine, "m:online", ttl_s=1.0, renew_s=0.1, owner="b")
    assert a.try_take()
    a.start_renewing()
    time.sleep(1.5)  # longer than the lease: the renewals keep it
    assert not b.try_take() and a.held
    a.stop_renewing()  # a stalls (a paused process): its lease runs out, b takes over
    assert b.wait(timeout_s=5.0) and b.lease.token == 2
    a.start_renewing()
    assert a.lost.wait(5.0)  # its next renewal finds token 2
    assert not a.held
    with pytest.raises(LeaseLost):
        a.fence()
    a.release()  # a's release leaves b's lease alone
    assert b.held and b.table.holder("m:online").owner == "b"
    b.release()
    assert a.try_take() and a.lease.token == 3  # released: taken at once
    a.release()


def test_a_standby_waits_out_a_store_that_is_down(engine, caplog):
    """Found by the fault suite: a store error while standing by (a PostgreSQL kill)
    escaped `wait`, and the learner exited; now the standby keeps waiting, says so once,
    and takes the lease once the store answers."""
    from flywheel.broker import free_port
    from flywheel.store import LeaseTable

    down = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    keeper = LeaseKeeper(down, "m:online", ttl_s=30.0, renew_s=0.05, owner="host:2:b")
    try:
        with caplog.at_level(logging.INFO, logger="flywheel.learner.lease"):
            assert not keeper.wait(timeout_s=0.5)  # ~10 tries against a dead store
            said = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
            assert len(said) == 1 and "host:2:b standing by for m:online" in said[0]
            result: list[bool] = []
            waiting = threading.Thread(target=lambda: result.append(keeper.wait(timeout_s=30)))
            waiting.start()
            time.sleep(0.3)
            keeper.table = LeaseTable(engine, ttl_s=30.0)  # the store answers again
            waiting.join(30)
        assert result == [True] and keeper.held and keeper.lease.token == 1
        keeper.release()
    finally:
        down.dispose()
