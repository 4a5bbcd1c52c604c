"""FLYWHEEL_GATE_REGISTER_FAILED: whether the learner registers candidates its gate rejects
(a real SQLite store and MLflow store; privacy off, since a private candidate is always
registered: the privacy ledger names the version its budget went to)."""

from __future__ import annotations

import pytest

from flywheel.learner import LearnerConfig, OnlineLearner, ensure_champion
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import Example, insert_ignoring_duplicates, make_engine, session_factory
from flywheel.store import upgrade as upgrade_store
from flywheel.streams import drift_concept
from tests.trusted import write_synthetic_trusted

pytestmark = pytest.mark.integration


def _add_examples(url: str, n: int, start: int) -> None:
    x, labels = drift_concept(7).sample(n, sample_seed=start)
    engine = make_engine(url)
    with session_factory(engine).begin() as session:
        insert_ignoring_duplicates(
            session,
            Example,
            [
                {
                    "dedup_key": f"t:{start + i}",
                    "origin": "correction",
                    "features": row.tolist(),
                    "label": label,
                    "weight": 1.0,
                    "split": "train",
                    "source": f"user-{start + i}",
                    "parent_prediction_id": f"p{start + i}",
                    "error_type": "confident",
                }
                for i, (row, label) in enumerate(zip(x, labels, strict=True))
            ],
        )
    engine.dispose()


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
        _add_examples(url, 50, 0)
        first = learner.step()
        _add_examples(url, 50, 1000)
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
