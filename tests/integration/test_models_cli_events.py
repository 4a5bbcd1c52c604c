"""`flywheel models promote` / `rollback` announce the change on the model-events topic."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from flywheel.broker import read_topic
from flywheel.cli import app, register_commands
from flywheel.events import ModelEvent
from flywheel.promotion import default_actor
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import Settings
from tests.versions import publish_version

pytestmark = pytest.mark.integration
register_commands()


def _publish(registry: Registry, parent: str) -> ModelVersion:
    return publish_version(registry, parent)


def test_promote_and_rollback_publish_model_events(settings: Settings, monkeypatch):
    registry = Registry.of(settings)
    v1 = _publish(registry, "")
    registry.set_champion(v1)
    v2 = _publish(registry, v1)
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    for key, value in {
        "HOME": str(settings.home),
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TOPIC_MODEL_EVENTS": settings.topic_model_events,
    }.items():
        monkeypatch.setenv(f"FLYWHEEL_{key}", str(value))
    runner = CliRunner()

    result = runner.invoke(app, ["models", "promote", v2, "--reason", "canary ok"])
    assert result.exit_code == 0, result.output
    assert f"announced on {settings.topic_model_events}" in result.stdout
    result = runner.invoke(app, ["models", "rollback", "--reason", "p99 regressed"])
    assert result.exit_code == 0, result.output
    assert f"announced on {settings.topic_model_events}" in result.stdout

    records = read_topic(settings.kafka_bootstrap, settings.topic_model_events, at_least=2)
    assert [r.key for r in records] == [settings.model_name.encode()] * 2
    events = [ModelEvent.model_validate_json(r.value) for r in records]
    assert [(e.kind, e.version, e.previous_version, e.reason) for e in events] == [
        ("promoted", v2, v1, "canary ok"),
        ("rolled_back", v1, v2, "p99 regressed"),
    ]
    assert {e.model_name for e in events} == {settings.model_name}
    assert {e.actor for e in events} == {default_actor()}
    assert Registry.of(settings).champion_version() == v1
