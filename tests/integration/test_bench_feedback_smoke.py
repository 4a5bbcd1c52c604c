"""The feedback benchmark keeps working end to end (figures belong to docs, not asserted)."""

from __future__ import annotations

import pytest

# 600 s, not the default 300: these start and wait for processes (fixture set-up counts)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_feedback_joins_everything_and_verifies_the_store(run_bench_process):
    doc = run_bench_process("feedback", "--records", "600", "--max-records", "300", "--rounds", "2")
    assert len(doc["rounds"]) == 2 and doc["summary"]["verified"]
    for each in doc["rounds"]:  # every round on its own database, every record joined
        assert each["verify"]["ok"], each["verify"]["checks"]
        assert each["worker"]["joined"] == 600 and each["raw"]["records"] == 1200
        assert each["worker"]["pending"] == 0  # read in time order: nothing waited
        # the store floor read and stored every record of both topics, once
        assert each["floor"]["records"] == each["floor"]["stored"] == 1200
    assert doc["summary"]["joined_per_s"] > 0 and doc["summary"]["ratio"] > 0
    # the fastest raw read is at least as fast as the median one
    assert 0 < doc["summary"]["ratio_to_fastest_raw"] <= doc["summary"]["ratio"]
    assert doc["summary"]["ratio_to_raw_with_json"] > 0
    if all(each["worker"]["postgresql_cpu_s"] is not None for each in doc["rounds"]):
        assert doc["summary"]["ratio_cpu_ceiling"] > 0  # PostgreSQL's CPU seen: a ceiling
    assert doc["summary"]["floor_ratio_to_raw"] > 0 and doc["summary"]["ratio_to_floor"] > 0
    assert all(len(each["raw"]["json_elapsed_s_each"]) == 3 for each in doc["rounds"])
    assert set(doc["summary"]["targets"]) == {"joined_per_s", "ratio_to_raw"}


def test_bench_feedback_times_a_group_of_worker_processes(run_bench_process):
    """`--workers 2`: two processes share the partitions and, together, every record."""
    doc = run_bench_process(
        "feedback",
        "--records",
        "600",
        "--max-records",
        "300",
        "--rounds",
        "1",
        "--workers",
        "2",
        "--partitions",
        "4",
    )
    assert doc["config"]["workers"] == 2 and doc["config"]["partitions"] == 4
    (each,) = doc["rounds"]
    assert each["verify"]["ok"], each["verify"]["checks"]
    worker = each["worker"]
    assert worker["time_split_s"] is None and worker["joined"] == 600
    members = worker["members"]
    assert len(members) == 2 and sum(m["joined"] for m in members) == 600
    owned = [tuple(p) for m in members for p in m["partitions"]]
    # 4 partitions of 3 topics (predictions, corrections, scores), each owned once
    assert len(owned) == len(set(owned)) == 12
    assert all(m["process_cpu_s"] > 0 for m in members)
