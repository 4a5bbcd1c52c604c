"""`bench serve --compare shadow` keeps working: both modes answer, every prediction is on
its topic, and the shadow's scores are on theirs, about the default share of the
predictions (figures are not asserted: they belong to docs/benchmarks.md)."""

from __future__ import annotations

import pytest

# 600 s, not the default 300: these start and wait for processes (fixture set-up counts)
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]


def test_bench_serve_compares_a_shadow_with_the_champion_alone(run_bench_process):
    doc = run_bench_process(
        "serve",
        "--compare",
        "shadow",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--rounds",
        "1",
        "--concurrency",
        "4",
    )
    assert [run["mode"] for run in doc["runs"]] == ["champion", "shadow"]
    summary = doc["summary"]
    for mode in ("champion", "shadow"):
        assert summary["median"][mode]["errors"] == summary["median"][mode]["non_200"] == 0
    assert summary["events_match"] and summary["events_logged"] > 0, summary
    champion, shadow = doc["runs"]
    assert champion["scores_logged"] is None  # the champion alone scores nothing
    scores = summary["shadow_scores"]
    assert scores["logged"] == shadow["scores_logged"] >= scores["counted"] > 0, scores
    # the default share (10 %) of the predictions, by prediction-id hash
    assert 0.05 < scores["share_of_predictions"] < 0.15, scores
    assert summary["throughput_ratio"] > 0 and summary["p99_ratio"] > 0
