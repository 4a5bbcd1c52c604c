"""`python -m bench canary` keeps working: one seed, a few trials.

Figures are not asserted (they belong to docs/benchmarks.md); the JSON structure and its
internal consistency are.
"""

from __future__ import annotations


def test_bench_canary_json_has_each_arm(run_bench):
    doc = run_bench(
        "canary",
        "--seeds",
        "1",
        "--trials",
        "4",
        "--aa-trials",
        "6",
        "--labels",
        "2000",
        "--no-shadow-throughput",
    )
    assert doc["benchmark"] == "canary"
    assert {"machine", "config", "models", "promote", "rollback", "aa", "date"} <= doc.keys()
    for arm in ("promote", "rollback"):
        live, gate = doc[arm]["live"], doc[arm]["gate"]
        assert live["trials"] == 4
        assert live["right"] + live["wrong"] == live["decided"] <= 4
        assert gate["labels_at_window"] == 5000 and gate["labels_at_min"] == 200
    aa = doc["aa"]
    assert aa["trials"] == 6 and 0 <= aa["false_decisions"] <= 6
    assert aa["alpha"] == doc["config"]["alpha"] == 0.05
    assert doc["shadow_throughput"] is None  # measured by bench serve's own smoke test
