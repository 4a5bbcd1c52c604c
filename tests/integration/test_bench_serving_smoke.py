"""The serving benchmarks (batching, cascade, quant) keep working on tiny settings.

Figures are not asserted (they belong to docs/benchmarks.md); the JSON structure and the
sanity of its values are.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_bench_quant_times_and_scores_every_precision(run_bench):
    doc = run_bench(
        "quant",
        "--models",
        "demo",
        "--batches",
        "1,8",
        "--train",
        "600",
        "--test",
        "300",
        "--epochs",
        "2",
        "--blocks",
        "1",
        "--block-s",
        "0.005",
    )
    assert doc["benchmark"] == "quant"
    (r,) = doc["results"]
    assert set(r["accuracy"]) == {"fp32", "int8", "bf16"}
    assert all(0 <= a <= 1 for a in r["accuracy"].values())
    assert r["accuracy_delta"]["fp32"] == 0
    assert all(r["us_per_call"][p][b] > 0 for p in r["us_per_call"] for b in ("1", "8"))


def test_bench_cascade_reports_test_set_figures(run_bench):
    doc = run_bench(
        "cascade",
        "--tasks",
        "rbf",
        "--train",
        "1500",
        "--calibration",
        "500",
        "--test",
        "500",
        "--epochs",
        "3",
        "--timing-rows",
        "20",
        "--light",
        "8",
        "--heavy",
        "32",
    )
    (run,) = doc["runs"]
    t = run["test"]
    assert t["n"] == 500 and 0 <= t["light_share"] <= 1
    assert 0 < t["heavy_accuracy"] <= 1 and 0 < t["cascade_accuracy"] <= 1
    assert run["flops_per_row"]["heavy"] > run["flops_per_row"]["light"] > 0
    assert set(run["targets"]) == {"flops_saved", "accuracy_ratio"}
    assert doc["all_pass"] == all(v["pass"] for v in run["targets"].values())


@pytest.mark.slow
def test_bench_batching_runs_both_modes_at_every_level(run_bench):
    doc = run_bench(
        "batching",
        "--models",
        "demo",
        "--concurrency",
        "1,8",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--rounds",
        "1",
        "--no-pin",
    )
    assert {(r["mode"], r["concurrency"]) for r in doc["runs"]} == {
        ("off", 1),
        ("off", 8),
        ("on", 1),
        ("on", 8),
    }
    assert all(r["load"]["errors"] == 0 and r["load"]["non_200"] == 0 for r in doc["runs"])
    assert all(r["load"]["count"] > 0 for r in doc["runs"])
    s = doc["summary"]["demo"]
    assert set(s["targets"]) == {"throughput_ratio@8", "p50_ratio@1"}
    on8 = s["median"]["on@8"]
    assert on8["mean_batch"] is None or on8["mean_batch"] >= 1
