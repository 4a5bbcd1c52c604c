"""`python -m bench privacy` keeps working on a tiny stream; figures live in the docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_privacy_json_reports_both_arms_and_the_gap(monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a plain folder, not installed
    from bench.__main__ import app

    result = CliRunner().invoke(
        app,
        [
            "privacy",
            "--scenarios",
            "demo",
            "--samples",
            "500",
            "--batch",
            "250",
            "--seeds",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, (result.stderr or "")[-3000:] + repr(result.exception)
    doc = json.loads(result.stdout)
    (sc,) = doc["scenarios"]
    assert sc["scenario"] == "demo"
    for arm in ("dp", "non_private"):
        assert 0 < sc[arm]["accuracy"] <= 1 and str(sc[arm]["lr"]) in sc[arm]["by_lr"]
    assert sc["gap_points"] == pytest.approx(
        100 * (sc["non_private"]["accuracy"] - sc["dp"]["accuracy"])
    )
    assert doc["noise_multiplier"] > 1  # calibrated for ε=3 over one update of 8 steps
    assert {"non-private", "ours (fused)", "ours (opacus)", "opacus ghost"} <= doc[
        "throughput_samples_per_s"
    ].keys()


def test_bench_privacy_defaults_compares_the_arms_on_drift_streams(
    monkeypatch: pytest.MonkeyPatch,
):
    from typer.testing import CliRunner

    monkeypatch.syspath_prepend(str(ROOT))
    from bench.__main__ import app

    args = ["privacy", "--defaults", "--scenarios", "sine_flip,demo", "--samples", "600"]
    result = CliRunner().invoke(app, [*args, "--warmup", "100", "--seeds", "1", "--json"])
    assert result.exit_code == 0, (result.stderr or "")[-3000:] + repr(result.exception)
    doc = json.loads(result.stdout)
    assert [r["stream"] for r in doc["streams"]] == ["sine_flip", "demo"]
    for r in doc["streams"]:
        assert 0 < r["dp"] <= 1 and 0 < r["non_private"] <= 1
        assert r["gap_points"] == pytest.approx(100 * (r["non_private"] - r["dp"]))
        assert 0 < r["epsilon_spent"] <= 3.0 + 1e-9  # the ledger's, within the budget
        # both mechanisms side by side at the same ε, each from its own ledger lineage
        assert set(r["mechanisms"]) == {"dp-sgd", "dp-ftrl"}
        assert r["dp"] == r["mechanisms"][doc["default_mechanism"]]["dp"]
        for arm in r["mechanisms"].values():
            assert 0 < arm["dp"] <= 1 and 0 < arm["epsilon_spent"] <= 3.0 + 1e-9
            assert arm["gap_points"] == pytest.approx(100 * (r["non_private"] - arm["dp"]))
    gaps = [r["gap_points"] for r in doc["streams"]]
    assert doc["mean_gap_points"] == pytest.approx(sum(gaps) / 2)
    assert doc["worst_gap_points"] == max(gaps)
    ftrl = [r["mechanisms"]["dp-ftrl"]["gap_points"] for r in doc["streams"]]
    assert doc["by_mechanism"]["dp-ftrl"]["worst_gap_points"] == max(ftrl)
    bad = CliRunner().invoke(app, [*args[:3], "shuttle", "--samples", "600", "--json"])
    assert bad.exit_code != 0  # a scenario of the other mode is refused, not run
