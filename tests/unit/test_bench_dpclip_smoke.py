"""`python -m bench dpclip` keeps working: one step per method on the demo model.

Figures are not asserted (they belong to docs/benchmarks.md); the JSON structure is.
"""

from __future__ import annotations


def test_bench_dpclip_json_has_every_method_and_target(run_bench):
    doc = run_bench(
        "dpclip",
        "--models",
        "demo",
        "--batch",
        "16",
        "--seconds",
        "0",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--min-steps",
        "1",
    )
    assert doc["benchmark"] == "dpclip"
    assert {"machine", "config", "models", "summary", "date", "command"} <= doc.keys()
    (model,) = doc["models"]
    assert model["name"] == "demo" and model["architecture"] == "8-64-64-3"
    methods = {"ours", "ghost", "hooks", "nonprivate", "ours_nonoise", "ours_autograd"}
    assert set(model["samples_per_s"]) == methods == set(model["samples_per_cpu_s"])
    assert all(v > 0 for v in model["samples_per_s"].values())
    assert all(len(model["runs"][m]) == 1 and model["runs"][m][0]["steps"] >= 1 for m in methods)
    assert {"vs_nonprivate", "vs_ghost", "vs_hooks", "vs_ours_autograd"} <= set(model["targets"])
    assert model["pass"] == (
        model["targets"]["vs_nonprivate"]["pass"] and model["targets"]["vs_ghost"]["pass"]
    )
    assert doc["summary"]["all_pass"] == model["pass"]
