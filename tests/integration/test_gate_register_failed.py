"""FLYWHEEL_GATE_REGISTER_FAILED: whether the learner registers candidates its gate rejects
(a real SQLite store and MLflow store; privacy off, since a private candidate is always
registered: the privacy ledger names the version its budget went to)."""

from __future__ import annotations

import pytest

from flywheel.learner import LearnerConfig, OnlineLearner, ensure_champion
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import upgrade as upgrade_store
from tests.examples import add_drift_examples
from tests.trusted import write_synthetic_trusted

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("register_failed", [False, True])
def test_rejected_candidates_are_registered_only_when_asked(settings: Settings, register_failed):
    s = settings.model_copy(
        update={
            "learn_batch": 50,
            "learn_cursor_grace_s": 0.0,
            "privacy_enabled": False,
            # no recent holdout at all: every candidate is rejected ("only 0 recent ...")
            "gate_min_holdout": 1_000_000,
            "gate_register_failed": register_failed,
        }
    )
    url = s.resolved_database_url
    upgrade_store(url)
    ensure_champion(s.trusted, Registry.of(s))
    write_synthetic_trusted(s)
    registry = Registry.of(s)
    seed = registry.champion_version()
    learner = OnlineLearner(LearnerConfig.of(s), registry)
    learner.start()
    try:
        add_drift_examples(url, 50, 0)
        first = learner.step()
        add_drift_examples(url, 50, 1000)
        second = learner.step()
    finally:
        learner.lease.release()
    assert first is not None and second is not None
    assert not first.gate.passed and not second.gate.passed
    assert second.first_id > first.last_id  # the cursor moved on either way
    versions = [v.version for v in registry.versions()]
    if register_failed:
        assert first.version is not None and second.version is not None
        assert second.parent_version == first.version
        assert len(versions) == 3
    else:
        assert (first.version, second.version) == (None, None)
        assert versions == [seed]  # the registry holds only the seed model
        assert second.parent_version == seed  # the last registered version
