"""`flywheel models shadow | canary [--stop]` on a real (SQLite) MLflow registry: the alias
moves, the version is signed and tagged with who and why, and the refusals (an unknown
version, the champion as its own shadow or canary, stopping the wrong version) say why
and change nothing. The model event they announce is checked on the real broker in
tests/integration/test_live_serving.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from flywheel.cli import app, register_commands
from flywheel.promotion import default_actor
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import Settings, prepare_home
from flywheel.signing import default_key_paths, load_public_keys, verify
from tests.versions import publish_version

register_commands()
runner = CliRunner()


def _publish(registry: Registry, parent: str) -> ModelVersion:
    return publish_version(registry, parent, input_dim=3, hidden=4)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """v1 champion, v2 and v3 candidates."""
    home = tmp_path_factory.mktemp("roles-cli") / "home"
    settings = Settings(home=home)
    prepare_home(settings)
    registry = Registry.of(settings)
    v1 = _publish(registry, "")
    registry.set_champion(v1)
    assert (_publish(registry, v1), _publish(registry, v1)) == ("2", "3")
    return home


@pytest.fixture()
def home(template: Path, tmp_path: Path, monkeypatch) -> Path:
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    copy = tmp_path / "home"
    shutil.copytree(template, copy)
    monkeypatch.setenv("FLYWHEEL_HOME", str(copy))
    monkeypatch.setenv("COLUMNS", "200")
    return copy


def registry_at(home: Path) -> Registry:
    return Registry.of(Settings(home=home))


def models(*args: str) -> Result:
    return runner.invoke(app, ["models", *args])


@pytest.mark.parametrize("role", ["shadow", "canary"])
def test_a_role_is_set_signed_and_tagged(home, role):
    result = models(role, "v2", "--reason", "try it live")
    assert result.exit_code == 0, result.output
    assert f"flywheel v2 is the {role} (was no {role})" in result.stdout
    assert "no model event sent" in result.stdout
    registry = registry_at(home)
    assert registry.role_version(role) == "2"
    loaded = registry.load("2")
    assert (loaded.tags[f"{role}_by"], loaded.tags[f"{role}_reason"]) == (
        default_actor(),
        "try it live",
    )
    # signed as a promotion is: a service verifies it before running it
    keys = load_public_keys([default_key_paths(Settings(home=home).home_dir)[1]])
    verify(
        loaded.tags,
        keys,
        model="flywheel",
        version="2",
        artifact_sha256=loaded.artifact_sha256,
    )
    # another version takes the role over; the one it replaced is named
    result = models(role, "3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["kind"], doc["role"], doc["version"], doc["previous_version"]) == (
        "role_changed",
        role,
        "3",
        "2",
    )
    assert doc["changed"] is True and doc["announced"] is None
    assert registry_at(home).roles() == {"champion": "1", role: "3"}


@pytest.mark.parametrize("role", ["shadow", "canary"])
def test_stop_clears_the_role_and_says_who_held_it(home, role):
    assert models(role, "2").exit_code == 0
    result = models(role, "3", "--stop")  # not the one running: refused, nothing changes
    assert result.exit_code == 1
    assert f"v3 is not the {role} (v2 is)" in result.stderr
    assert registry_at(home).role_version(role) == "2"
    result = models(role, "--stop", "--reason", "enough")
    assert result.exit_code == 0, result.output
    assert f"flywheel v2 is no longer the {role}; by {default_actor()}: enough" in result.stdout
    assert "services pick up the change when they next poll" in result.stdout
    assert registry_at(home).role_version(role) is None
    assert registry_at(home).info("2", with_run=False).tags[f"{role}_end_reason"] == "enough"
    result = models(role, "--stop", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["changed"] is False and f"flywheel has no {role}" in doc["message"]


def test_the_champion_cannot_be_its_own_shadow_or_canary(home):
    for role in ("shadow", "canary"):
        result = models(role, "1")
        assert result.exit_code == 1
        assert "v1 is the champion; it cannot also be the" in result.stderr
    assert registry_at(home).roles() == {"champion": "1"}


def test_an_unknown_version_and_a_missing_version_are_refused(home):
    result = models("shadow", "42")
    assert result.exit_code == 1 and "no version '42'" in result.stderr
    result = models("canary")  # neither a version nor --stop
    assert result.exit_code == 2 and "or --stop" in result.output
    assert models("canary", "x3").exit_code == 2  # not a version number
    assert registry_at(home).roles() == {"champion": "1"}


def test_setting_the_role_it_already_holds_changes_nothing(home):
    assert models("shadow", "2").exit_code == 0
    before = registry_at(home).info("2", with_run=False).tags
    result = models("shadow", "2")
    assert result.exit_code == 0, result.output
    assert "v2 is already the shadow; nothing changed" in result.stdout
    assert registry_at(home).info("2", with_run=False).tags == before


def test_models_list_marks_the_roles_each_version_holds(home):
    assert models("shadow", "2").exit_code == 0
    assert models("canary", "3").exit_code == 0
    result = models("list", "--json")
    assert result.exit_code == 0, result.output
    roles = {d["version"]: d["roles"] for d in json.loads(result.stdout)}
    assert roles == {"1": [], "2": ["shadow"], "3": ["canary"]}
    table = models("list").stdout
    rows = {v: next(line for line in table.splitlines() if f" {v} " in line) for v in ("v2", "v3")}
    assert "shadow" in rows["v2"] and "canary" in rows["v3"] and "shadow" not in rows["v3"]
    assert models("shadow", "--stop").exit_code == 0
    roles = {d["version"]: d["roles"] for d in json.loads(models("list", "--json").stdout)}
    assert roles["2"] == []
