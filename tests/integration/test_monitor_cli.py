"""`flywheel monitor` on a real SQLite store holding hand-made live traffic
(tests/monitoring_rows.py, moved to the present): the table, `--json`, `--segment`, and
the errors a person gets for a bad window, an unknown feature or no store."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

import flywheel.cli.monitor  # noqa: F401  (the command registers on import)
from flywheel.cli import app
from flywheel.settings import Settings, prepare_home
from flywheel.store import upgrade
from tests.monitoring_rows import MODEL, fill

runner = CliRunner()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    monkeypatch.setenv("FLYWHEEL_MODEL_NAME", MODEL)
    monkeypatch.delenv("FLYWHEEL_DATABASE_URL", raising=False)
    settings = Settings(home=home)
    prepare_home(settings)
    return settings


def test_json_report_per_version(home):
    upgrade(home.resolved_database_url)
    fill(home.resolved_database_url, now=datetime.now(UTC))
    result = runner.invoke(app, ["monitor", "--json", "--window", "24h"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["window_s"] == 86400.0 and doc["model_name"] == MODEL
    v = {d["version"]: d for d in doc["versions"]}
    assert set(v) == {"1", "2", "3"}
    assert v["1"]["labelled"] == 30 and v["1"]["accuracy"] == pytest.approx(0.8)
    assert v["3"]["drift"]["level"] == "major"
    assert "segments" not in v["1"]


def test_table_with_a_segment(home):
    upgrade(home.resolved_database_url)
    fill(home.resolved_database_url, now=datetime.now(UTC))
    result = runner.invoke(app, ["monitor", "--segment", "country"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "live accuracy per version" in out
    assert "80.0 % [62.7 %, 90.5 %]" in out  # v1: 24 of 30, Wilson 95 %
    assert "amount (major)" in out  # v3's shifted inputs
    assert "v2 (shadow)" in out
    assert "per segment of country" in out and "DE" in out and "FR" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--window", "forever"], "expected a number and a unit"),
        (["--window", "500d"], "between 1 s and 366 days"),
        (["--segment", "colour"], "no such feature; the features: amount, country"),
        (["--sample", "5"], "5"),
    ],
)
def test_bad_options_are_usage_errors(home, args, message):
    upgrade(home.resolved_database_url)
    fill(home.resolved_database_url, now=datetime.now(UTC))
    result = runner.invoke(app, ["monitor", *args], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_without_a_store_it_says_so(home):
    result = runner.invoke(app, ["monitor"])
    assert result.exit_code == 1
    assert "no training store at" in result.output
