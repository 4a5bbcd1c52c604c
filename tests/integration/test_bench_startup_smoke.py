"""`python -m bench startup` keeps working (figures are not asserted: they belong to docs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_startup_times_read_commands_side_by_side(run_bench):
    this = str(Path(sys.executable).parent / "flywheel")
    doc = run_bench(
        "startup", "--rounds", "1", "--only", "help,feedback-report", "--baseline", this
    )
    assert set(doc) == {
        "help (this)",
        "help (baseline)",
        "feedback-report (this)",
        "feedback-report (baseline)",
    }
    assert all(r["median_s"] > 0 and len(r["all_s"]) == 1 for r in doc.values())


def test_bench_startup_refuses_an_unknown_process(run_bench):
    with pytest.raises(AssertionError, match="unknown"):
        run_bench("startup", "--only", "help,nonsense")
