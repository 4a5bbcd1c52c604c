"""`python -m bench init` keeps working (figures are not asserted: they belong to docs)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_init_imports_a_small_csv_and_reports_both_sides(run_bench):
    doc = run_bench("init", "--size-mb", "0.5")
    rows = doc["config"]["rows"]
    init = doc["init"]
    assert rows > 0 and init["rows_train"] + init["rows_holdout"] == rows
    assert doc["floor"]["rows_per_s"] > 0 and init["passes_rows_per_s"] > 0
    assert init["peak_rss_mb"] > doc["floor"]["peak_rss_mb"] > 0
    assert doc["ratio"]["passes_vs_floor"] > 0 and doc["peak_rss_under_limit"] in (True, False)
    assert set(init["phases_s"]) == {"schema", "import", "train", "publish"}
