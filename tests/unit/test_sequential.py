"""The always-valid paired test (flywheel/sequential.py): its error rate under the null,
its power, and that it never decides on agreement alone."""

from __future__ import annotations

import numpy as np
import pytest

from flywheel.sequential import PairedTest


def _run(p_candidate: float, p_champion: float, n: int, rng: np.random.Generator) -> PairedTest:
    """Independent right/wrong outcomes of two models on n labelled requests, read after
    every label; stops at the first decision."""
    test = PairedTest(alpha=0.05)
    cand = rng.random(n) < p_candidate
    champ = rng.random(n) < p_champion
    for c, h in zip(cand.tolist(), champ.tolist(), strict=True):
        if test.update(candidate_right=c, champion_right=h) is not None:
            break
    return test


def test_equal_models_are_told_apart_no_more_often_than_alpha_however_long_it_watches():
    rng = np.random.default_rng(7)
    runs = 300
    decided = sum(_run(0.8, 0.8, 3000, rng).decision is not None for _ in range(runs))
    # alpha 0.05: 15 expected at most; 4 SE of a binomial(300, 0.05) above is ~30
    assert decided / runs <= 0.05 + 4 * (0.05 * 0.95 / runs) ** 0.5


def test_a_better_candidate_is_promoted_and_a_worse_one_is_caught():
    rng = np.random.default_rng(8)
    better = [_run(0.9, 0.75, 5000, rng) for _ in range(20)]
    assert all(t.decision == "candidate" for t in better)
    assert np.median([t.labels for t in better]) < 600
    worse = [_run(0.7, 0.85, 5000, rng) for _ in range(20)]
    assert all(t.decision == "champion" for t in worse)


def test_agreement_is_no_evidence_and_the_counts_are_checked():
    test = PairedTest()
    for _ in range(10_000):
        test.update(candidate_right=True, champion_right=True)
    assert test.decision is None and test.log_evidence == 0.0 and test.labels == 10_000
    with pytest.raises(ValueError, match="alpha"):
        PairedTest(alpha=1.0)
    with pytest.raises(ValueError, match="more discordant"):
        PairedTest(candidate_wins=3, champion_wins=3, labels=5)
    evidence = PairedTest(candidate_wins=40, champion_wins=5, labels=100).evidence()
    assert evidence["decision"] == "candidate" and evidence["accuracy_difference"] == 0.35
