"""The lineage lease on real SQLite and PostgreSQL: one holder, fencing tokens, takeover."""

from __future__ import annotations

import threading
import time

import pytest

from flywheel.privacy import PrivacyLedger
from flywheel.store import ExampleReader, LeaseLost, LeaseTable, make_engine
from flywheel.store import upgrade as upgrade_store
from tests.deadlines import deadline

pytestmark = pytest.mark.integration
LINEAGE = "m:online"
TTL = 1.0  # short, so a takeover is quick; the waits below are in multiples of it


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade_store(url)
    return url


@pytest.fixture()
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _wait_until(condition, timeout_s: float) -> None:
    until = time.monotonic() + deadline(timeout_s)
    while not condition():
        assert time.monotonic() < until, f"not within {timeout_s} s"
        time.sleep(0.05)


def test_one_holder_at_a_time_and_a_new_token_at_each_takeover(engine):
    table = LeaseTable(engine, ttl_s=TTL)
    a = table.try_acquire(LINEAGE, "a")
    assert a is not None and a.token == 1
    assert table.try_acquire(LINEAGE, "b") is None  # a's lease runs
    holder = table.holder(LINEAGE)
    assert holder is not None and (holder.owner, holder.token) == ("a", 1)
    assert 0 < holder.expires_in_s <= TTL
    assert table.try_acquire("other:online", "b").token == 1  # another lineage is free
    # a stops renewing: b takes over once a's lease ran out, under the next token
    b = None
    until = time.monotonic() + deadline(5 * TTL)
    while b is None:
        assert time.monotonic() < until, "no takeover"
        b = table.try_acquire(LINEAGE, "b")
        time.sleep(0.05)
    assert b.token == 2
    with pytest.raises(LeaseLost, match="held by b under token 2"):
        a.check()
    a.release()  # a's release cannot end b's lease
    assert table.try_acquire(LINEAGE, "c") is None
    b.release()  # a clean stop: the next one takes it at once
    c = table.try_acquire(LINEAGE, "c")
    assert c is not None and c.token == 3


def test_every_guarded_write_renews_the_lease(engine):
    table = LeaseTable(engine, ttl_s=TTL)
    a = table.try_acquire(LINEAGE, "a")
    reader = ExampleReader(engine)
    end = time.monotonic() + 3 * TTL
    while time.monotonic() < end:  # writes every 0.3 ttl keep it, however long
        reader.save_state(LINEAGE, {"update": 1}, 5, fence=a)
        assert table.try_acquire(LINEAGE, "b") is None
        time.sleep(0.3 * TTL)


def test_a_write_by_a_superseded_holder_is_refused_and_changes_nothing(engine):
    table = LeaseTable(engine, ttl_s=TTL)
    old = table.try_acquire(LINEAGE, "old")
    reader, ledger = ExampleReader(engine), PrivacyLedger(engine)
    reader.save_state(LINEAGE, {"update": 3}, 40, fence=old)
    _wait_until(lambda: table.try_acquire(LINEAGE, "new") is not None, 5 * TTL)
    entry = {
        "lineage": LINEAGE,
        "update_no": 4,
        "accountant": "rdp",
        "engine": "opacus",
        "sample_rate": 0.5,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "steps": 8,
        "delta": 1e-5,
        "epsilon_update": 1.0,
        "epsilon_lineage": 1.0,
        "sources": 1,
        "examples": 1,
        "public_examples": 0,
        "capped_examples": 0,
        "excluded_examples": 0,
    }
    with pytest.raises(LeaseLost):
        ledger.record(entry, {"source:a": (1, 1.0)}, fence=old)
    with pytest.raises(LeaseLost):
        reader.save_state(LINEAGE, {"update": 2}, 10, fence=old)  # a cursor going back
    assert ledger.entries(LINEAGE) == []
    assert reader.load_state(LINEAGE) == {"update": 3}


def test_a_lease_that_ran_out_untaken_is_still_its_holders_and_a_write_renews_it(engine):
    """The token is the fence: nobody else can have written while nobody took it over."""
    table = LeaseTable(engine, ttl_s=TTL)
    a = table.try_acquire(LINEAGE, "a")
    time.sleep(TTL + 0.2)
    ExampleReader(engine).save_state(LINEAGE, {"update": 1}, 0, fence=a)
    assert table.try_acquire(LINEAGE, "b") is None  # renewed by the write
    assert table.holder(LINEAGE).token == 1


def test_of_many_learners_starting_at_once_exactly_one_gets_the_lease(db_url):
    engines = [make_engine(db_url) for _ in range(6)]
    got: list[int] = []
    barrier = threading.Barrier(len(engines))

    def take(i: int) -> None:
        table = LeaseTable(engines[i], ttl_s=30.0)
        barrier.wait()
        if table.try_acquire(LINEAGE, f"learner-{i}") is not None:
            got.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in engines:
        e.dispose()
    assert len(got) == 1, got
    holder = LeaseTable(make_engine(db_url), ttl_s=30.0).holder(LINEAGE)
    assert holder.owner == f"learner-{got[0]}" and holder.token == 1
