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


def test_bench_fedrobust_fltrust_reference_in_each_world(run_bench):
    """`--world same` replaces the platform's trusted set by a root set of the sites'
    world: round 1's reference comes from it (ratio 1.0–2.1 in the full runs). `--world
    drifted` keeps the pre-drift trusted set the champion already fits (ratio 0.008):
    round 1 falls back to the replies' median, and the model moves (it used to stay at
    the champion's 0.367 with every trust score 0)."""
    args = ("--sites", "3", "--rounds", "2", "--local-steps", "2", "--strategies", "fltrust")
    same = run_bench("fedrobust", *args, "--attacks", "none", "--world", "same")
    assert same["world"] == "same" and same["root_rows"] == 100
    trust = same["results"]["fltrust"]["none"]["trust"]
    assert trust[0]["reference"] == "trusted" and trust[0]["ratio"] >= 0.1
    assert len(trust[0]["scores"]) == len(trust[0]["sites"]) == 3
    assert all(0 <= s <= 1 for s in trust[0]["scores"])
    drifted = run_bench("fedrobust", *args, "--attacks", "none", "--world", "drifted")
    assert drifted["world"] == "drifted" and drifted["root_rows"] == 0
    first = drifted["results"]["fltrust"]["none"]["trust"][0]
    assert first["reference"] == "median" and first["ratio"] < 0.1
    assert max(first["scores"]) > 0
