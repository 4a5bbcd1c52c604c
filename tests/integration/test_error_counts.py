"""The error counters on real PostgreSQL: workers that add to the same counter rows at
once wait for each other, never deadlock, and lose no count."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from flywheel.feedback.examples import ExampleBuilder
from flywheel.store import make_engine, session_factory, upgrade
from flywheel.store.models import ErrorCount

pytestmark = pytest.mark.integration
HOUR = datetime(2026, 3, 1, 12, tzinfo=UTC)
K1 = ("m", "1", HOUR, "a", "b", "confident")
K2 = ("m", "1", HOUR, "b", "a", "boundary")


def test_two_transactions_add_to_the_same_counters_in_opposite_orders(pg_url, wait_for_lock_wait):
    """A holds K1 and will want K2; B is handed K2 first, then K1. Locking in the order
    given, B would hold K2 while it waits for K1, and A's K2 would close the cycle
    (PostgreSQL then aborts one of them). In key order, B waits for K1 holding nothing."""
    upgrade(pg_url)
    engine = make_engine(pg_url)
    sessions = session_factory(engine)
    try:
        with sessions.begin() as s:  # the rows exist: each upsert below updates (locks) one
            ExampleBuilder.count(s, Counter({K1: 1, K2: 1}))
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with sessions.begin() as b:
                    ExampleBuilder.count(b, Counter({K2: 10, K1: 10}))
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                errors.append(exc)

        with sessions() as a:
            ExampleBuilder.count(a, Counter({K1: 100}))
            thread = threading.Thread(target=second)
            thread.start()
            wait_for_lock_wait(sessions)
            ExampleBuilder.count(a, Counter({K2: 100}))
            a.commit()
        thread.join(30)
        assert not thread.is_alive()
        assert errors == []
        with sessions() as s:
            counts = {
                (r.predicted, r.actual, r.outcome): r.count for r in s.scalars(select(ErrorCount))
            }
        assert counts == {("a", "b", "confident"): 111, ("b", "a", "boundary"): 111}
    finally:
        engine.dispose()
