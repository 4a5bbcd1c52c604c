"""`python -m bench storage` keeps working at a tiny size (figures belong to docs)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_storage_fills_drops_and_joins(run_bench, pg_url):
    del pg_url  # skips (or fails under CI) without PostgreSQL, like every PostgreSQL test
    doc = run_bench("storage", "--predictions", "20000", "--batches", "2", "--batch", "200")
    assert doc["fill"]["predictions"] == 20_000 and doc["fill"]["corrections"] == 400
    assert doc["bytes_per_prediction"] > 0
    month, kept = doc["month"], doc["after_retention"]
    assert month["partitions"] >= 30  # a day each, and the catch-alls
    assert kept["dropped_partitions"] > 0 and kept["store_bytes"] < month["store_bytes"]
    # 8 days of 30 are kept (predictions the retention's whole days hold)
    assert 20_000 * 8 / 30 - 1 <= kept["predictions"] <= 20_000 * 9 / 30 + 1
    for when in ("start", "end", "after_retention"):
        join = doc["join"][when]
        assert join["joined"] == join["corrections"] > 0 and join["corrections_per_s"] > 0
    assert doc["join"]["end_vs_start"] > 0
