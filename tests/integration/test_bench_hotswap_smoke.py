"""The hotswap benchmark keeps working end to end (its figures belong to docs, not asserted;
its correctness checks are: zero failed requests, registered versions only, one swap per
promotion, and prediction events that name the versions the responses named)."""

from __future__ import annotations

import json

import pytest

from tests.benchrun import bench_process

# 600 s, not the default 300: these start and wait for processes (fixture set-up counts)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_hotswap_swaps_under_load_and_verifies_every_response():
    r = bench_process(
        "hotswap",
        "--window",
        "4",
        "--rounds",
        "1",
        "--interval",
        "2",
        "--warmup",
        "0.5",
        "--concurrency",
        "4",
    )
    doc = json.loads(r.stdout) if r.stdout.strip() else None
    assert r.returncode == 0, (doc or {}).get("summary") or r.stderr[-3000:]
    summary, result = doc["summary"], doc["result"]
    assert summary["ok"] and all(c["ok"] for c in summary["checks"].values())
    assert len(doc["promotions"]) == 2 and doc["server"]["swaps"] == 2
    assert set(result["responses_per_version"]) == set(doc["config"]["registered_versions"])
    assert result["pooled"]["steady"]["count"] > 0 and result["pooled"]["swap"]["count"] > 0
    assert summary["throughput_ratio"] > 0 and summary["p99_ratio"] > 0
    assert set(summary["targets"]) == {"errors", "p99_ratio"}
