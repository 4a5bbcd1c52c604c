"""`python -m bench faults` at tiny sizes: one fault, a low rate; the document's structure
and its counts (the full scenario is tests/faults). The durable-corrections ratio is
`bench serve --compare corrections` run as a process of its own (smoke-tested with the
serve benchmark); here it is skipped (`--durable-seconds 0`): with it the run took 282 s,
against the runner's 300 s limit."""

from __future__ import annotations

import os

import pytest

from bench._pg_server import find_pg_bin

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_faults_counts_one_fault_and_reports_the_durable_ratio(run_bench_process):
    if find_pg_bin() is None:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("initdb/pg_ctl not found: bench faults starts its own PostgreSQL")
        pytest.skip("initdb/pg_ctl not found: bench faults starts its own PostgreSQL")
    doc = run_bench_process(
        "faults",
        "--rate",
        "4",
        "--seconds",
        "1",
        "--faults",
        "replica-kill",
        "--durable-seconds",
        "0",
    )
    result = doc["result"]
    (fault,) = result["faults"]
    assert fault["fault"] == "replica-kill" and fault["down_s"] > 0 and fault["catch_up_s"] >= 0
    assert result["predictions_returned"] > 0 and result["corrections_acknowledged"] > 0
    assert result["predictions_lost"] == result["corrections_lost"] == 0
    assert doc["targets"]["lost"] == {"target": "0", "value": 0, "pass": True}
    assert result["starts"]["replica-0"] == 2 and result["exited_by_themselves"] == []
    assert doc["durable_corrections"] is None
