"""The learner benchmarks (prequential, elastic) keep working on tiny streams.

Figures are not asserted (they belong to docs/benchmarks.md); the JSON structure and the
sanity of its values are.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_bench_prequential_runs_every_learner_on_every_stream(run_bench):
    doc = run_bench("prequential", "--samples", "400", "--warmup", "200")
    assert doc["benchmark"] == "prequential"
    assert [s["name"] for s in doc["streams"]] == ["sea", "hyperplane", "agrawal"]
    for s in doc["streams"]:
        assert s["measured"] == 200
        assert set(s["accuracy"]) == {"ours", "logreg", "hat", "arf"}
        assert all(0.0 <= a <= 1.0 for a in s["accuracy"].values())
        assert s["accuracy"]["ours"] > 0.5  # better than a coin on 2 classes
        assert set(s["targets"]) == {"vs_logreg", "vs_hat", "vs_arf"}
        assert s["pass"] == all(t["pass"] for t in s["targets"].values())
        run = s["runs"][0]
        assert all(sec >= 0 for sec in run["seconds"].values())
        parts = run["segments"]["ours"]
        assert parts[0]["start"] == 200 and parts[-1]["end"] == 400
    assert doc["config"]["ours"]["trainer"]["replay"] == 0.0
    assert doc["summary"]["runtime_s"] > 0


def test_bench_elastic_measures_recovery_for_fixed_and_elastic_rates(run_bench):
    doc = run_bench(
        "elastic",
        "--scenarios",
        "demo,sea-flip",
        "--seeds",
        "1",
        "--before",
        "800",
        "--after",
        "400",
        "--warmup",
        "300",
        "--holdout",
        "300",
        "--window",
        "100",
        "--rates",
        "0.003,0.01",
    )
    assert doc["benchmark"] == "elastic"
    cfg = doc["config"]  # the default: what `flywheel learn` runs, with or without the response
    assert cfg["preset"] == "production"
    assert set(cfg["arms"]) == {"elastic", "fixed", "background", "arf"}
    assert cfg["ours"]["hidden"] == [64, 64] and cfg["ours"]["trainer"]["replay"] == 2.0
    assert cfg["ours"]["trainer"]["drift_replay"] and cfg["ours"]["trainer"]["boost_window"]
    assert [s["name"] for s in doc["scenarios"]] == ["demo", "sea-flip"]
    for sc in doc["scenarios"]:
        assert sc["drift_at"] == 800
        assert set(sc["cells"]) == {
            f"{mode}@{lr}"
            for mode in ("fixed", "elastic", "background")
            for lr in ("0.003", "0.01")
        } | {"arf"}
        for key, cell in sc["cells"].items():
            assert 0.0 <= cell["prequential_accuracy"] <= 1.0
            assert 0.0 < cell["pre_accuracy"] <= 1.0
            assert 0 <= cell["recovery"] <= 400 and cell["rolling_recovery"] >= 100
            # a fixed rate never boosts; the elastic one may
            assert cell["max_boost"] == 1.0 if key.startswith("fixed") else cell["max_boost"] >= 1
        c = sc["comparison"]
        assert c["best_fixed_lr"] in (0.003, 0.01) and c["best_elastic_lr"] in (0.003, 0.01)
        assert c["ratio"] >= 0 and c["pass"] == (c["ratio"] <= 0.5)
        # ours (the production response: elastic + background) against ARF, on reversals only
        if c["arf_recovery"]:
            ratio = c["best_background_recovery"] / c["arf_recovery"]
            assert c["arf_ratio"] == pytest.approx(ratio)
        reversal = sc["name"] == "sea-flip"
        assert c["arf_pass"] == ((c["arf_ratio"] <= 1.0) if reversal else None)
        assert len(sc["curves"]["fixed"]["held_out_accuracy"]) == 5  # t = 0, 100, ..., 400
    demo = doc["scenarios"][0]["cells"]["elastic@0.003"]
    assert demo["max_boost"] > 1.0  # shifted inputs and a new concept: the boost fires
