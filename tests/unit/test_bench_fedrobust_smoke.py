"""`python -m bench fedrobust` keeps working: one strategy, no attacker and the ×1e6 one,
three sites, two rounds. Figures are not asserted (docs/benchmarks.md holds them); the
JSON structure is, and that the ×1e6 site is refused by the server's bounds."""

from __future__ import annotations


def test_bench_fedrobust_json_has_each_strategy_and_attack(run_bench):
    doc = run_bench(
        "fedrobust",
        "--sites",
        "3",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--strategies",
        "fedavg",
        "--attacks",
        "none,scale",
    )
    assert doc["benchmark"] == "fedrobust" and doc["sites"] == 3
    assert set(doc["results"]) == {"fedavg"} and set(doc["results"]["fedavg"]) == {"none", "scale"}
    none, scale = doc["results"]["fedavg"]["none"], doc["results"]["fedavg"]["scale"]
    assert len(none["accuracy"]) == 2 and 0 <= none["last2"] <= 1
    assert none["refused"] == 0 and scale["refused"] >= 1  # the attacker, whenever asked
    assert set(doc["points_lost"]["fedavg"]) == {"scale"}
