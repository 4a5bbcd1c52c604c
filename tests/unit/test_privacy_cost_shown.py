"""The cost of privacy, shown: the demo summary, the version tags, ε in plain words."""

from __future__ import annotations

import math

import pytest

from flywheel.demo.report import markdown, privacy_summary
from flywheel.privacy import epsilon_in_words, posterior_bound


def _candidate(version: int, dp: float, plain: float, trusted: float, plain_trusted: float):
    return {
        "version": str(version),
        "parent_version": str(version - 1),
        "examples": 100,
        "lr": 0.01,
        "promoted": True,
        "gate": "passed",
        "privacy": {
            "epsilon": 0.5 * version,
            "recent_accuracy": dp,
            "trusted_accuracy": trusted,
            "nonprivate_recent_accuracy": plain,
            "nonprivate_trusted_accuracy": plain_trusted,
        },
    }


def test_the_summary_gives_dp_against_the_same_run_without_dp_on_both_holdouts():
    candidates = [
        _candidate(2, 0.50, 0.90, 0.80, 0.95),  # older than the last 2: not averaged
        _candidate(3, 0.70, 0.90, 0.90, 0.95),
        _candidate(4, 0.80, 0.92, 0.94, 0.96),
    ]
    p = privacy_summary(candidates, True, 3.0, 1e-5, last=2, mechanism="dp-ftrl")
    assert p["mechanism"] == "dp-ftrl" and p["candidates_compared"] == 2
    assert p["recent_accuracy_dp"] == pytest.approx(0.75)
    assert p["recent_accuracy_without_dp"] == pytest.approx(0.91)
    assert p["recent_gap_points"] == pytest.approx(16.0)
    assert p["trusted_gap_points"] == pytest.approx(100 * (0.955 - 0.92))
    assert p["epsilon_spent"] == 2.0 and "e^3 ≈ 20×" in p["meaning"]
    summary = {
        "requests": 10,
        "drift_at_request": 5,
        "elapsed_s": 1.0,
        "recovered": True,
        "accuracy_flywheel_before_drift": 0.9,
        "accuracy_frozen_before_drift": 0.9,
        "accuracy_flywheel_after_drift": 0.8,
        "accuracy_frozen_after_drift": 0.4,
        "accuracy_flywheel_after_drift_all": 0.7,
        "accuracy_frozen_after_drift_all": 0.4,
        "freshness_median_s": 1.0,
        "freshness_p95_s": 2.0,
        "freshness_samples": 3,
        "candidates": candidates,
        "privacy": p,
    }
    md = markdown(summary)
    assert "DP-FTRL (tree aggregation)" in md
    assert "| recent | 75.0% | 91.0% | 16.0 points |" in md
    assert "| trusted | 92.0% | 95.5% | 3.5 points |" in md
    assert "| v4 | v3 | 100 | 0.01 | yes | 0.800 / 0.920 | passed |" in md
    assert "What the budget means for one person" in md


def test_without_dp_the_summary_says_so_and_the_table_has_no_comparison():
    assert privacy_summary([], False, 3.0, 1e-5) == {"enabled": False}
    c = _candidate(2, 0.5, 0.9, 0.8, 0.9) | {"privacy": None}
    assert privacy_summary([c], True, 3.0, 1e-5)["recent_gap_points"] is None


@pytest.mark.parametrize(("eps", "prior", "most"), [(3.0, 0.01, 0.169), (3.0, 0.5, 0.953)])
def test_a_belief_moves_at_most_by_e_to_the_epsilon_in_odds(eps, prior, most):
    bound = posterior_bound(eps, prior)
    assert bound == pytest.approx(most, abs=5e-4)
    odds = bound / (1 - bound) / (prior / (1 - prior))
    assert odds == pytest.approx(math.exp(eps))
    assert posterior_bound(0.0, prior) == pytest.approx(prior)
    text = epsilon_in_words(eps, 1e-5)
    assert f"{100 * most:.1f} %" in text and "whole life of the model lineage" in text
    with pytest.raises(ValueError):
        posterior_bound(-1.0, 0.5)
