"""The topic configs Flywheel sends: retention on the topics that hold data about people."""

from __future__ import annotations

from typing import Any

import kafka
import pytest

from flywheel.broker import ensure_topics, retention_configs
from flywheel.settings import Settings


class RecordingAdmin:
    """kafka-python's KafkaAdminClient, as far as `ensure_topics` uses it."""

    existing: set[str] = set()
    created: list[Any] = []
    altered: list[Any] = []

    def __init__(self, **_: Any) -> None:
        pass

    def list_topics(self) -> list[str]:
        return sorted(self.existing)

    def create_topics(self, topics: list[Any]) -> None:
        RecordingAdmin.created.extend(topics)

    def alter_configs(self, resources: list[Any]) -> None:
        RecordingAdmin.altered.extend(resources)

    def close(self) -> None:
        pass


@pytest.fixture()
def admin(monkeypatch):
    RecordingAdmin.existing, RecordingAdmin.created, RecordingAdmin.altered = set(), [], []
    monkeypatch.setattr(kafka, "KafkaAdminClient", RecordingAdmin)
    return RecordingAdmin


def test_the_data_topics_keep_records_as_long_as_the_store_keeps_predictions():
    s = Settings(_env_file=None, retention_predictions_s=3 * 86400, correction_expiry_s=3600)
    configs = retention_configs(s.kafka, s.feedback)
    assert configs == {
        t: {"retention.ms": str(3 * 86400 * 1000)}
        for t in ("flywheel.predictions", "flywheel.scores", "flywheel.corrections")
    }


def test_new_topics_are_created_with_their_configs_and_alter_touches_only_existing(admin):
    s = Settings(_env_file=None)
    configs = retention_configs(s.kafka, s.feedback)
    admin.existing = {"flywheel.corrections", "flywheel.deadletter"}
    created = ensure_topics("x:1", s.topics, 3, configs=configs)
    assert set(created) == set(s.topics) - admin.existing
    sent = {t.name: t.topic_configs for t in admin.created}
    assert sent["flywheel.predictions"] == configs["flywheel.predictions"]
    assert sent["flywheel.model-events"] == {}
    assert admin.altered == []  # without alter, existing topics are left as they are
    admin.created = []
    ensure_topics("x:1", s.topics, 3, configs=configs, alter=True)
    assert [(r.name, r.configs) for r in admin.altered] == [
        ("flywheel.corrections", configs["flywheel.corrections"])
    ]
