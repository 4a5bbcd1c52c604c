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


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_window_of_the_last_hour_holds_every_correction_of_the_last_hour(store, request):
    """Read at 10:05, "the last hour" starts at 09:05: the 09:00 counter holds corrections
    from 09:45 (20 minutes earlier) and must be in, on both stores; the 08:00 counter is
    out. Before, counter hours were compared with 09:05 itself and 09:00 was left out."""
    from datetime import timedelta

    from flywheel.feedback import error_report
    from flywheel.review.store_views import accuracy_timeline

    url = request.getfixturevalue("sqlite_url" if store == "sqlite" else "pg_url")
    upgrade(url)
    engine = make_engine(url)
    nine, eight = datetime(2026, 3, 1, 9, tzinfo=UTC), datetime(2026, 3, 1, 8, tzinfo=UTC)
    now = nine + timedelta(hours=1, minutes=5)
    try:
        with session_factory(engine).begin() as s:
            ExampleBuilder.count(
                s,
                Counter(
                    {
                        ("m", "1", nine, "a", "b", "confident"): 3,
                        ("m", "1", nine, "a", "a", "correct"): 7,
                        ("m", "1", eight, "a", "b", "confident"): 50,
                    }
                ),
            )
        with session_factory(engine)() as s:
            (v,) = error_report(s, "m", hours=1, now=now)["versions"]
        assert (v["corrections"], v["errors"]) == (10, 3)
        with session_factory(engine)() as s:  # two hours back from 10:05: 08:05, so 08:00 is in
            (v,) = error_report(s, "m", hours=2, now=now)["versions"]
        assert (v["corrections"], v["errors"]) == (60, 53)
        points = accuracy_timeline(engine, "m", hours=1, now=now)["points"]
        assert [(p["hour"], p["corrections"]) for p in points] == [(nine.isoformat(), 10)]
    finally:
        engine.dispose()
