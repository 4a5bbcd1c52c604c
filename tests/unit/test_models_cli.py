"""`flywheel models list | show | promote | rollback` on a real (SQLite) MLflow registry.

A registry with four versions is built once per module from small untrained models (no
training: these commands never load weights) and copied for each test, so every test can
move the alias without affecting the others.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from flywheel.cli import app, register_commands
from flywheel.modelspec import ModelSpec, build_model
from flywheel.promotion import default_actor
from flywheel.registry import Registry
from flywheel.settings import Settings, prepare_home

register_commands()  # the real wiring: `models` must be among the registered command modules
runner = CliRunner()

REJECTED = "rejected: not better on recent data; recent 0.600 vs 0.810 (n=40)"
PASSED = "passed: better on recent data; recent 0.810 vs 0.620 (n=40)"
JSON_KEYS = {
    "version",
    "champion",
    "status",
    "source",
    "parent_version",
    "examples",
    "epsilon",
    "delta",
    "gate",
    "created_at",
    "run_id",
    "tags",
    "params",
    "metrics",
}


def _publish(
    registry: Registry,
    parent: str,
    source: str,
    examples: str,
    epsilon: str,
    gate: str,
    metrics: dict[str, float] | None = None,
    params: dict[str, object] | None = None,
) -> str:
    spec = ModelSpec(input_dim=3, hidden=[4], labels=["a", "b"])
    return registry.publish(
        spec,
        build_model(spec),
        tags={
            "parent_version": parent,
            "source": source,
            "examples": examples,
            "epsilon": epsilon,
            "delta": "1e-05" if epsilon != "none" else "none",
            "gate": gate,
        },
        metrics=metrics,
        params=params,
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """v1 seed (manual) → v2 online (promoted) → v3 online (rejected), v4 federated (champion)."""
    home = tmp_path_factory.mktemp("models-cli") / "home"
    settings = Settings(home=home)
    prepare_home(settings)
    registry = Registry.of(settings)
    v1 = _publish(
        registry,
        "",
        "manual",
        "seed[0,800)",
        "none",
        "initial: no champion to compare",
        metrics={"holdout_accuracy": 0.9},
        params={"seed": 7},
    )
    registry.set_champion(v1)  # as ensure_champion does: no promotion tags on the seed
    v2 = _publish(
        registry,
        v1,
        "online",
        "[0,100)",
        "0.5",
        PASSED,
        params={"lr": 0.003},
        metrics={"gate_recent_candidate": 0.81, "gate_trusted_candidate": 0.95},
    )
    registry.promote(v2, reason="gate passed", actor="learner")
    v3 = _publish(
        registry,
        v2,
        "online",
        "[100,200)",
        "0.7",
        REJECTED,
        metrics={"gate_recent_candidate": float("nan"), "gate_trusted_candidate": 0.94},
    )
    v4 = _publish(
        registry,
        v2,
        "federated",
        "sites=3 rounds=5",
        "1.2",
        PASSED,
        metrics={"gate_recent_candidate": 0.84, "gate_trusted_candidate": 0.96},
    )
    registry.promote(v4, reason="gate passed", actor="superlink")
    assert (v1, v2, v3, v4) == ("1", "2", "3", "4")
    return home


@pytest.fixture()
def home(template: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the template registry, and an environment that points at it."""
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    copy = tmp_path / "home"
    shutil.copytree(template, copy)
    monkeypatch.setenv("FLYWHEEL_HOME", str(copy))
    monkeypatch.setenv("COLUMNS", "200")  # rich: no wrapped or cut cells to assert against
    return copy


def registry_at(home: Path) -> Registry:
    return Registry.of(Settings(home=home))


def models(*args: str) -> Result:
    return runner.invoke(app, ["models", *args])


def row(output: str, version: str) -> str:
    """The list-table line of `version`."""
    lines = [ln for ln in output.splitlines() if ln.strip().startswith(f"v{version} ")]
    assert len(lines) == 1, output
    return lines[0]


# --- list -------------------------------------------------------------------------------------


def test_list_piped_is_tab_separated_with_nothing_cut_or_padded(home, monkeypatch):
    """No terminal and no COLUMNS (a pipe): one line per version, every cell whole (the gate
    reason too), no line padded to a width."""
    monkeypatch.delenv("COLUMNS")
    result = models("list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("# ") and lines[1].split("\t")[:2] == ["version", "status"]
    by_version = {ln.split("\t")[0]: ln.split("\t") for ln in lines[2:]}
    assert set(by_version) == {"v1", "v2", "v3", "v4"}
    header = lines[1].split("\t")
    assert all(len(cells) == len(header) for cells in by_version.values())
    v4 = dict(zip(header, by_version["v4"], strict=True))
    assert v4["status"] == "★ champion" and v4["source"] == "federated"
    assert v4["gate"] == "passed: better on recent data; recent 0.810 vs 0.620 (n=40)"
    assert all(ln == ln.rstrip() for ln in lines)


def test_list_table_marks_the_champion_and_shows_where_each_version_came_from(home):
    result = models("list")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "4 of 4 versions" in out and "champion v4" in out
    assert "★ champion" in row(out, "4") and "federated" in row(out, "4")
    assert "★" not in row(out, "3") + row(out, "2") + row(out, "1")
    assert "former" in row(out, "1") and "former" in row(out, "2")
    v3 = row(out, "3")
    for fact in ("online", "v2", "[100,200)", "0.7", "0.940", "rejected: not better"):
        assert fact in v3
    assert "0.810" in row(out, "2") and "0.950" in row(out, "2")
    assert "seed[0,800)" in row(out, "1") and "0.900" in row(out, "1")  # trusted = holdout
    lines = out.splitlines()
    order = [lines.index(row(out, v)) for v in ("4", "3", "2", "1")]
    assert order == sorted(order), "newest first"


def test_list_json_has_stable_keys_and_nothing_else_on_stdout(home):
    result = models("list", "--json")
    assert result.exit_code == 0, result.output
    docs = json.loads(result.stdout)
    assert [d["version"] for d in docs] == ["4", "3", "2", "1"]
    assert all(set(d) == JSON_KEYS | {"roles"} for d in docs)  # list: the live roles too
    assert all(d["roles"] == [] for d in docs)  # none held here
    by = {d["version"]: d for d in docs}
    assert [v for v, d in by.items() if d["champion"]] == ["4"]
    assert {v: d["status"] for v, d in by.items()} == {
        "4": "champion",
        "3": "candidate",
        "2": "former champion",
        "1": "former champion",
    }
    assert by["1"]["parent_version"] is None and by["3"]["parent_version"] == "2"
    assert by["3"]["gate"] == REJECTED and by["3"]["epsilon"] == "0.7"
    assert by["3"]["metrics"] == {
        "gate_recent_candidate": None,  # NaN is not JSON
        "gate_trusted_candidate": 0.94,
    }
    assert by["2"]["params"] == {"lr": "0.003"}
    assert by["2"]["tags"]["promoted_by"] == "learner"
    assert datetime.fromisoformat(by["4"]["created_at"]).tzinfo is not None


def test_list_limit_shows_the_newest(home):
    docs = json.loads(models("list", "--json", "--limit", "2").stdout)
    assert [d["version"] for d in docs] == ["4", "3"]
    assert "2 of 4 versions" in models("list", "-n", "2").stdout
    assert models("list", "--limit", "-1").exit_code == 2


def test_list_of_an_empty_registry_is_empty_with_a_hint(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "empty"))
    result = models("list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert "no versions" in result.stderr
    result = models("list")
    assert result.exit_code == 0, result.output
    assert "0 of 0 versions" in result.stdout and "champion none" in result.stdout
    assert "no versions of 'flywheel'" in result.stdout


def test_list_in_a_narrow_terminal_wraps_rather_than_cutting_numbers(home, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = models("list")
    assert result.exit_code == 0, result.output
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    assert "0.940" in result.stdout and "0.9…" not in result.stdout


# --- show -------------------------------------------------------------------------------------


def test_show_prints_every_tag_param_metric_and_the_lineage(home):
    result = models("show", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "flywheel v2" in out and "former champion" in out
    for text in (
        "parent_version",
        "promoted_by",
        "learner",
        "promotion_reason",
        "gate passed",
        PASSED,
        "lr",
        "0.003",
        "gate_recent_candidate",
        "0.81",
    ):
        assert text in out
    lineage = out.split("lineage:", 1)[1]
    assert lineage.index(" v2 ") < lineage.index(" v1 ")
    assert " v3 " not in lineage and " v4 " not in lineage


def test_show_json_lineage_walks_parents_down_to_the_seed(home):
    result = models("show", "v4", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == JSON_KEYS | {"model_name", "lineage"}
    assert (doc["version"], doc["champion"], doc["model_name"]) == ("4", True, "flywheel")
    assert doc["tags"]["promoted_by"] == "superlink"
    assert doc["metrics"] == {"gate_recent_candidate": 0.84, "gate_trusted_candidate": 0.96}
    chain = doc["lineage"]
    assert [h["version"] for h in chain] == ["4", "2", "1"]
    assert [h["source"] for h in chain] == ["federated", "online", "manual"]
    assert [h["parent_version"] for h in chain] == ["2", "1", None]
    assert not any(h["missing"] for h in chain)


def test_show_lineage_stops_at_a_parent_that_is_gone(home):
    _publish(registry_at(home), "99", "online", "[200,300)", "0.1", PASSED)
    doc = json.loads(models("show", "5", "--json").stdout)
    assert [(h["version"], h["missing"]) for h in doc["lineage"]] == [("5", False), ("99", True)]


def test_a_long_lineage_is_shortened_in_the_table_but_whole_in_json(home):
    registry = registry_at(home)
    parent = "4"
    for i in range(25):  # an online learner: each candidate is the next one's parent
        parent = _publish(registry, parent, "online", f"[{i}00,{i + 1}00)", "0.1", PASSED)
    assert parent == "29"
    doc = json.loads(models("show", "29", "--json").stdout)
    assert [h["version"] for h in doc["lineage"]] == [str(v) for v in range(29, 4, -1)] + [
        "4",
        "2",
        "1",
    ]
    out = models("show", "29").stdout.split("lineage:", 1)[1]
    assert "(28 versions)" in out and "9 more" in out
    assert " v29 " in out and " v12 " in out and " v1 " in out  # newest 18 and the root
    assert " v11 " not in out and " v2 " not in out


def test_a_passed_candidate_awaiting_review_says_so(home):
    registry = registry_at(home)
    version = _publish(registry, "4", "online", "[300,400)", "0.2", PASSED)
    registry.set_tags(version, {"review": "pending"})  # what the learner does without auto-promote
    assert json.loads(models("show", version, "--json").stdout)["status"] == "pending review"
    assert "pending review" in row(models("list").stdout, version)
    assert models("promote", version).exit_code == 0
    assert json.loads(models("show", version, "--json").stdout)["status"] == "champion"


def test_show_unknown_version_is_an_error(home):
    result = models("show", "42")
    assert result.exit_code == 1
    assert "no version '42'" in result.stderr and not result.stdout


@pytest.mark.parametrize("bad", ["abc", "0", "-3", "3.0", "v", "1e3"])
def test_a_version_that_is_not_a_number_is_a_usage_error(home, bad):
    for command in (["show", bad], ["promote", bad]):
        result = models(*command)
        assert result.exit_code == 2, (command, result.output)
        assert "VERSION" in result.output
    assert registry_at(home).champion_version() == "4"


# --- promote and rollback -----------------------------------------------------------------------


def test_promote_moves_the_alias_and_records_who_and_why(home):
    result = models("promote", "3", "--reason", "hotfix for site 7")
    assert result.exit_code == 0, result.output
    assert "promoted flywheel v3 to champion (was v4)" in result.stdout
    assert "no model event sent" in result.stdout and "poll" in result.stdout
    assert "did not pass its gate" in result.stderr  # v3's gate rejected it
    registry = registry_at(home)
    assert registry.champion_version() == "3"
    tags = registry.info("3", with_run=False).tags
    assert tags["promoted_by"] == default_actor()
    assert tags["promotion_reason"] == "hotfix for site 7"
    assert registry.champion_history()[-2:] == ["4", "3"]


def test_free_text_in_tags_is_printed_as_is_not_as_markup(home):
    assert models("promote", "3", "--reason", "[urgent] [bold]site 7[/bold]").exit_code == 0
    result = models("show", "3")
    assert result.exit_code == 0, result.output
    assert "[urgent] [bold]site 7[/bold]" in result.stdout


def test_promote_has_a_default_reason(home):
    assert models("promote", "v1").exit_code == 0
    tags = registry_at(home).info("1", with_run=False).tags
    assert tags["promotion_reason"] == "manual promotion"


def test_promoting_the_champion_changes_nothing(home):
    before = registry_at(home).info("4", with_run=False).tags
    result = models("promote", "4")
    assert result.exit_code == 0, result.output
    assert "already the champion" in result.stdout
    registry = registry_at(home)
    assert registry.info("4", with_run=False).tags == before
    assert registry.champion_history() == ["1", "2", "4"]


def test_promote_unknown_version_fails_and_leaves_the_champion(home):
    result = models("promote", "42")
    assert result.exit_code == 1
    assert "no version '42'" in result.stderr
    assert registry_at(home).champion_version() == "4"


def test_an_empty_reason_is_refused(home):
    assert models("promote", "3", "--reason", " ").exit_code == 2
    assert models("rollback", "-r", "").exit_code == 2
    assert models("promote", "3", "--reason", "ok\x1b[2J").exit_code == 2  # a control char
    assert registry_at(home).champion_version() == "4"


def test_rollback_goes_back_one_champion_at_a_time(home):
    result = models("rollback", "--reason", "accuracy dropped")
    assert result.exit_code == 0, result.output
    assert "rolled flywheel back from v4 to v2" in result.stdout
    registry = registry_at(home)
    assert registry.champion_version() == "2"
    tags = registry.info("4", with_run=False).tags
    assert (tags["rolled_back_by"], tags["rollback_reason"]) == (
        default_actor(),
        "accuracy dropped",
    )
    assert json.loads(models("show", "4", "--json").stdout)["status"] == "rolled back"

    assert models("rollback").exit_code == 0
    assert registry_at(home).champion_version() == "1"
    result = models("rollback")
    assert result.exit_code == 1
    assert "no earlier champion" in result.stderr
    assert registry_at(home).champion_version() == "1"


def test_rollback_undoes_a_manual_promotion(home):
    assert models("promote", "3").exit_code == 0
    assert models("rollback").exit_code == 0
    assert registry_at(home).champion_version() == "4"
    doc = json.loads(models("show", "3", "--json").stdout)
    assert doc["status"] == "rolled back"  # rolled back after it was promoted
    assert models("promote", "3").exit_code == 0  # and may be promoted again
    assert json.loads(models("show", "3", "--json").stdout)["status"] == "champion"


def test_promote_and_rollback_json_is_one_object_and_nothing_else(home):
    result = models("promote", "3", "--reason", "hotfix", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # the gate warning stays on stderr
    assert (doc["kind"], doc["version"], doc["previous_version"]) == ("promoted", "3", "4")
    assert doc["changed"] is True and doc["announced"] is None and doc["reason"] == "hotfix"
    assert "no model event sent" in doc["services"] and "did not pass" in result.stderr
    doc = json.loads(models("promote", "3", "--json").stdout)
    assert doc["changed"] is False and "already the champion" in doc["message"]
    doc = json.loads(models("rollback", "--json").stdout)
    assert (doc["kind"], doc["version"], doc["previous_version"]) == ("rolled_back", "4", "3")
    assert registry_at(home).champion_version() == "4"


def test_rollback_with_nothing_to_roll_back(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "empty"))
    result = models("rollback")
    assert result.exit_code == 1
    assert "no champion to roll back" in result.stderr


def test_promote_with_an_unreachable_broker_still_promotes(home, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FLYWHEEL_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    result = models("promote", "2")
    assert result.exit_code == 0, result.output
    assert "could not announce on flywheel.model-events" in result.stdout
    assert registry_at(home).champion_version() == "2"
