"""Running a benchmark from a test the way it is run by hand: `python -m bench NAME ... --json`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.deadlines import deadline

ROOT = Path(__file__).resolve().parents[1]


def bench_process(name: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`python -m bench NAME *args --json` as its own process (the benchmarks that start
    servers and load generators), output captured; the caller reads the JSON."""
    return subprocess.run(
        [sys.executable, "-m", "bench", name, *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=deadline(timeout_s),
    )
