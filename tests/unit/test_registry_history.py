"""Registry.promote / rollback / champion_history edge cases on a real (SQLite) MLflow store.

The CLI tests cover the common paths; these pin down what rollback means after unusual
sequences (re-promotions, an alias moved by hand, a registry older than the history tag).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flywheel import registry as registry_module
from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import Registry, RegistryError
from flywheel.settings import CHAMPION_ALIAS, Settings, prepare_home

TAGS = {
    "parent_version": "",
    "source": "manual",
    "examples": "seed[0,10)",
    "epsilon": "none",
    "delta": "none",
    "gate": "test",
}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Three registered versions and no champion yet (the alias is each test's business)."""
    home = tmp_path_factory.mktemp("registry-history") / "home"
    settings = Settings(home=home)
    prepare_home(settings)
    registry = Registry.of(settings)
    spec = ModelSpec(input_dim=2, hidden=[2], labels=["a", "b"])
    versions = [
        registry.publish(
            spec, build_model(spec), tags=TAGS, metrics={"holdout_accuracy": 0.5 + i / 10}
        )
        for i in range(3)
    ]
    assert versions == ["1", "2", "3"]
    return home


@pytest.fixture()
def registry(template: Path, tmp_path: Path) -> Registry:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    return Registry.of(Settings(home=home))


def test_history_records_each_champion_once_in_order(registry):
    assert registry.champion_history() == []
    registry.set_champion("1")
    assert registry.promote("2", reason="r", actor="a") == "1"
    assert registry.promote("2", reason="again", actor="a") == "2"  # no duplicate entry
    assert registry.champion_history() == ["1", "2"]
    assert registry.promote("1", reason="back to the seed", actor="a") == "2"
    assert registry.champion_history() == ["1", "2", "1"]
    assert registry.rollback(reason="undo", actor="a") == ("1", "2")  # undoes the last move
    assert registry.champion_version() == "2"


def test_promote_of_an_unknown_version_changes_nothing(registry):
    registry.set_champion("1")
    with pytest.raises(RegistryError, match="no version '9'"):
        registry.promote("9", reason="r", actor="a")
    assert registry.champion_version() == "1"
    assert registry.champion_history() == ["1"]


def test_rollback_walks_back_and_then_refuses(registry):
    registry.set_champion("1")
    registry.promote("2", reason="r", actor="a")
    registry.promote("3", reason="r", actor="a")
    assert registry.rollback(reason="bad", actor="ops") == ("3", "2")
    tags = registry.info("3", with_run=False).tags
    assert (tags["rolled_back_by"], tags["rollback_reason"]) == ("ops", "bad")
    assert registry.champion_history() == ["1", "2"]
    assert registry.rollback(reason="bad", actor="ops") == ("2", "1")
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(reason="bad", actor="ops")
    assert registry.champion_version() == "1"
    assert registry.champion_history() == ["1"]


def test_rollback_without_any_champion(registry):
    with pytest.raises(RegistryError, match="no champion to roll back"):
        registry.rollback(reason="r", actor="a")


def test_rollback_of_a_registry_without_history(registry):
    """A registry whose alias was set before the history tag existed: nothing to go back to."""
    registry._ensure_registered_model()
    registry.client.set_registered_model_alias(registry.name, CHAMPION_ALIAS, "2")
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(reason="r", actor="a")
    assert registry.champion_version() == "2"


def test_rollback_after_the_alias_was_moved_by_hand_returns_to_the_last_recorded(registry):
    registry.set_champion("1")
    registry.promote("2", reason="r", actor="a")
    registry.client.set_registered_model_alias(registry.name, CHAMPION_ALIAS, "3")  # MLflow UI
    assert registry.rollback(reason="r", actor="a") == ("3", "2")
    assert registry.champion_version() == "2"
    assert registry.champion_history() == ["1", "2"]


def test_history_is_bounded(registry, monkeypatch):
    monkeypatch.setattr(registry_module, "HISTORY_LIMIT", 3)
    registry.set_champion("1")
    for version in ("2", "3", "1", "2"):
        registry.promote(version, reason="r", actor="a")
    assert registry.champion_history() == ["3", "1", "2"]


def test_versions_and_info(registry):
    registry.set_champion("2")
    infos = registry.versions(with_runs=True)
    assert [v.version for v in infos] == ["3", "2", "1"]
    assert [v.is_champion for v in infos] == [False, True, False]
    assert infos[0].metrics == {"holdout_accuracy": pytest.approx(0.7)}
    assert registry.versions()[0].metrics == {}  # runs are only read when asked for
    assert registry.info("1").metrics == {"holdout_accuracy": pytest.approx(0.5)}
    with pytest.raises(RegistryError, match="no version '7'"):
        registry.info("7")
