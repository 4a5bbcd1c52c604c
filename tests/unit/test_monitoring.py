"""The numbers of live monitoring on hand-made values: Wilson bounds, label-delay
percentiles, CBPE on a calibrated and an over-confident fake model, PSI of identical and
shifted inputs, and the window syntax."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flywheel.review import (
    cbpe,
    delay_stats,
    drift_level,
    feature_psi,
    nearest_rank,
    parse_window,
    psi,
    wilson,
)


def test_wilson_matches_the_textbook_values_and_stays_inside_zero_one():
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662; 0/10 -> 0 to 0.2775
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    lo, hi = wilson(1, 1)
    assert 0 < lo < 1 and hi == 1.0
    assert wilson(0, 0) == (None, None)
    for bad in ((-1, 5), (6, 5), (1, -1)):
        with pytest.raises(ValueError):
            wilson(*bad)


def test_wilson_covers_the_true_accuracy_about_95_percent_of_the_time():
    from scipy.stats import binom

    # exact coverage at n = 200, p = 0.9: sum of P(k) over the k whose interval holds p
    n, p = 200, 0.9
    covered = sum(
        binom.pmf(k, n, p) for k in range(n + 1) if wilson(k, n)[0] <= p <= wilson(k, n)[1]
    )
    assert 0.93 < covered < 0.97


def test_delay_percentiles_are_nearest_rank_values():
    delays = [float(s) for s in range(1, 101)]  # 1..100 s
    stats = delay_stats(delays[::-1])
    assert stats == {"n": 100, "p50_s": 50.0, "p90_s": 90.0, "p99_s": 99.0, "max_s": 100.0}
    assert delay_stats([], None) == {
        "n": 0,
        "p50_s": None,
        "p90_s": None,
        "p99_s": None,
        "max_s": None,
    }
    assert delay_stats([5.0], 7.5)["max_s"] == 7.5  # the exact max from SQL wins
    assert nearest_rank([3.0], 0.99) == 3.0
    with pytest.raises(ValueError):
        nearest_rank([1.0], 0.0)


def test_cbpe_estimates_a_calibrated_models_accuracy_and_not_an_overconfident_ones():
    rng = np.random.default_rng(11)
    confidence = rng.uniform(0.5, 1.0, size=20_000)
    right = rng.uniform(size=confidence.size) < confidence  # calibrated: P(right) = conf
    estimate = cbpe(confidence.tolist())
    assert estimate == pytest.approx(right.mean(), abs=0.01)
    # the same predictions from a model that says 0.99 every time: CBPE overshoots
    assert cbpe([0.99] * confidence.size) - right.mean() > 0.2
    assert cbpe([]) is None


def test_psi_is_zero_for_identical_inputs_and_large_for_shifted_ones():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=20_000)
    same = rng.normal(size=5_000)
    assert feature_psi(reference, reference, "numeric") == 0.0
    assert feature_psi(reference, same, "numeric") < 0.02  # sampling noise only
    assert 0.1 < feature_psi(reference, same + 0.5, "numeric") < 0.25 + 0.1
    assert feature_psi(reference, same + 1.0, "numeric") > 0.25
    cats = rng.integers(1, 4, size=10_000).astype(float)
    assert feature_psi(cats, cats, "categorical") == 0.0
    assert feature_psi(cats, np.ones(1000), "categorical") > 1.0
    # a category the reference never had counts (floored share), not a division by zero
    assert math.isfinite(feature_psi(cats, np.full(100, 9.0), "categorical"))
    assert feature_psi(reference, np.empty(0), "numeric") is None
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1.0])
    assert [drift_level(v) for v in (None, 0.05, 0.1, 0.3)] == [
        "unknown",
        "stable",
        "moderate",
        "major",
    ]


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("24h", 86400.0),
        ("30m", 1800.0),
        ("7d", 604800.0),
        ("2w", 1209600.0),
        ("90", 90.0),
        ("1.5h", 5400.0),
        (" 10 S", 10.0),
    ],
)
def test_window_syntax(text, seconds):
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "24x", "0s", "400d", "nan", "1e3"])
def test_a_bad_window_says_what_is_expected(text):
    with pytest.raises(ValueError, match="window"):
        parse_window(text)
