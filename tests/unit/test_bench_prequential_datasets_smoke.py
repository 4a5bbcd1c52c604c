"""`python -m bench prequential --datasets` keeps working on small cuts of real data sets.

Figures are not asserted (they belong to docs/benchmarks.md); the JSON structure, the
stream each learner saw and the sanity of the values are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_app(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a plain folder, not installed
    from bench.__main__ import app

    return app


def invoke(app, *args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, ["prequential", *args])


def test_datasets_run_every_learner_on_the_same_drifted_stream(bench_app):
    result = invoke(
        bench_app,
        "--datasets",
        "penguins,phishing",
        "--samples",
        "300",
        "--warmup",
        "100",
        "--drift-at",
        "0.5",
        "--json",
    )
    assert result.exit_code == 0, (result.stderr or "")[-3000:] + repr(result.exception)
    doc = json.loads(result.stdout)
    assert [s["name"] for s in doc["streams"]] == ["penguins", "phishing"]  # no river streams
    penguins, phishing = doc["streams"]
    for s in doc["streams"]:
        assert s["kind"] == "dataset" and s["samples"] == 300
        assert s["warmup"] == 60 and s["measured"] == 240  # a fifth of the rows, not 100
        assert s["drifts"] == [150] and "trade places" in s["drift"]
        assert set(s["accuracy"]) == {"ours", "logreg", "hat", "arf"}
        assert all(0.0 <= a <= 1.0 for a in s["accuracy"].values())
        assert set(s["targets"]) == {"vs_logreg", "vs_hat", "vs_arf"}
        for base, t in s["targets"].items():
            want = 100 * (s["accuracy"]["ours"] - s["accuracy"][base.removeprefix("vs_")])
            assert t["difference_points"] == pytest.approx(want)
        parts = s["runs"][0]["segments"]["ours"]
        assert [(p["start"], p["end"]) for p in parts] == [(60, 150), (150, 300)]
    # our model is what `flywheel init` would make of each: categoricals are embedded
    assert penguins["ours_spec"]["family"] == "embed_mlp"
    assert "island:categorical" in penguins["ours_spec"]["inputs"]
    assert penguins["categorical"] == ["island", "sex"]
    assert penguins["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert phishing["ours_spec"]["family"] == "mlp" and phishing["categorical"] == []
    assert penguins["accuracy"]["ours"] > 0.6  # well above a 3-class guess, drift included
    assert doc["config"]["ours"]["linear_head"] is True  # the default model, as init makes it


def test_unknown_data_set_is_refused_with_the_choices(bench_app):
    result = invoke(bench_app, "--datasets", "adult", "--json")
    assert result.exit_code == 2
    assert "unknown data set adult; choose from image_segments" in result.output
