"""Deadlines that scale with how fast this machine runs right now.

A wait tuned on a quiet machine fails on a busy one: `make test` once failed
`test_feedback_crash[sqlite]` ("only 0 of 1200 joined" after 120 s at load average 10-18;
it passed alone). So every test wait is `deadline(seconds)`: `seconds` as it is on a quiet
machine, times a speed factor measured once per test session (per xdist worker).

The factor is the median wall time of a fixed CPU-bound loop over the loop's time on a quiet
machine of this kind (an idle core of the 2-core CI machine: 0.058 s for 10^6 iterations, so
`REFERENCE_S` for `LOOP` iterations), clamped to [1, `MAX_FACTOR`]: a fast machine keeps the
deadlines as written, a stalled one waits at most `MAX_FACTOR` times longer. On the shared
2-core machine at load average 2.7 the loop took 0.25 s per 10^6 (factor 4: the cores are
shared beyond what the load average shows). `TEST_DEADLINE_FACTOR` (a number >= 1) sets the
factor instead of measuring it.
"""

from __future__ import annotations

import os
import statistics
import time

__all__ = ["MAX_FACTOR", "deadline", "measure_speed_factor", "speed_factor"]

LOOP = 200_000
REFERENCE_S = 0.0116  # LOOP iterations on an idle core of the CI machine (0.058 s per 10^6)
RUNS = 9
MAX_FACTOR = 4.0
ENV = "TEST_DEADLINE_FACTOR"

_factor: float | None = None


def _loop() -> float:
    start = time.perf_counter()
    x = 0
    for i in range(LOOP):
        x += i * i
    return time.perf_counter() - start


def measure_speed_factor() -> float:
    """The median of `RUNS` timed loops over `REFERENCE_S`, clamped to [1, MAX_FACTOR]
    (about 0.1 s on a quiet machine, 0.5 s on a stalled one)."""
    measured = statistics.median(_loop() for _ in range(RUNS)) / REFERENCE_S
    return min(max(measured, 1.0), MAX_FACTOR)


def speed_factor() -> float:
    """This session's factor: `TEST_DEADLINE_FACTOR` if set, else measured on first use."""
    global _factor
    if _factor is None:
        raw = os.environ.get(ENV, "").strip()
        if raw:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{ENV}={raw!r} is not a number") from None
            if not value >= 1.0:
                raise ValueError(f"{ENV}={raw!r}: the factor must be a number >= 1")
            _factor = value
        else:
            _factor = measure_speed_factor()
    return _factor


def deadline(seconds: float) -> float:
    """`seconds` (a wait that is enough on a quiet machine) scaled by `speed_factor()`."""
    return seconds * speed_factor()
