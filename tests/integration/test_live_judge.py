"""The live judge rolls back a worse champion end to end: a migrated SQLite training store
with outcomes rows, a real MLflow (SQLite) registry, the learner's guarded promotion and a
real broker carrying the model events."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from flywheel.broker import read_topic
from flywheel.cli import app, register_commands
from flywheel.events import ModelEvent
from flywheel.learner import LiveJudge
from flywheel.promotion import promote
from flywheel.registry import ModelVersion, Registry
from flywheel.settings import Settings
from flywheel.store import Outcome, open_store, session_factory, upgrade
from tests.versions import publish_version

pytestmark = pytest.mark.integration
register_commands()


def _publish(registry: Registry, parent: str) -> ModelVersion:
    return publish_version(registry, parent, gate="passed: test")


def _outcomes(engine, model: str, guard: str, champion: str) -> None:
    """300 labelled predictions both scored: the guard alone right on 60, the champion
    alone on 15, both on 200 (the champion answered them, the guard scored them)."""
    t = datetime.now(UTC)
    rows = []
    for i, (g_right, c_right) in enumerate(
        [(True, False)] * 60 + [(False, True)] * 15 + [(True, True)] * 200 + [(False, False)] * 25
    ):
        for version, right in ((guard, g_right), (champion, c_right)):
            p = 0.8 if right else 0.3
            rows.append(
                Outcome(
                    prediction_id=f"pred-{i}",
                    model_version=version,
                    model_name=model,
                    answered=version == champion,
                    label="a",
                    predicted="a" if right else "b",
                    correct=right,
                    p_true=p,
                    log_loss=-math.log(p),
                    confidence=max(p, 1 - p),
                    predicted_at=t,
                    labelled_at=t,
                )
            )
    with session_factory(engine)() as session:
        session.add_all(rows)
        session.commit()


def test_a_worse_champion_is_rolled_back_on_live_evidence(settings: Settings, monkeypatch):
    upgrade(settings.resolved_database_url)
    engine = open_store(settings.resolved_database_url)
    registry = Registry.of(settings)
    v1 = _publish(registry, "")
    registry.set_champion(v1)
    v2 = _publish(registry, v1)
    # the learner's promotion path (FLYWHEEL_LIVE_GUARD): v1 becomes v2's guard
    promote(
        settings.kafka, v2, reason="gate passed", registry=registry, gate="passed: test", guard=True
    )
    assert registry.roles() == {"champion": v2, "guard": v1}
    _outcomes(engine, registry.name, guard=v1, champion=v2)

    # the reviewer's view first: read only, nothing moves
    for key in [k for k in os.environ if k.startswith("FLYWHEEL_")]:
        monkeypatch.delenv(key)
    # piped output is tab-separated unless COLUMNS asks for a table (flywheel.cli.tables);
    # another test in this process may have left it set
    monkeypatch.delenv("COLUMNS", raising=False)
    for key, value in {
        "HOME": str(settings.home),
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TOPIC_MODEL_EVENTS": settings.topic_model_events,
    }.items():
        monkeypatch.setenv(f"FLYWHEEL_{key}", str(value))
    result = CliRunner().invoke(app, ["models", "judge", "--json"])
    assert result.exit_code == 0, result.output
    (pair,) = json.loads(result.stdout)["pairs"]
    assert (pair["role"], pair["would"], pair["action"]) == ("guard", "rolled_back", "none")
    assert (pair["evidence"]["candidate_only_right"], pair["evidence"]["champion_only_right"]) == (
        60,
        15,
    )
    assert registry.roles() == {"champion": v2, "guard": v1}
    result = CliRunner().invoke(app, ["models", "judge"])  # piped: tab-separated rows
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("guard\t"))
    assert row.split("\t")[1:5] == [f"v{v1}", f"v{v2}", "300", "60 / 15"], row
    assert row.split("\t")[-2:] == ["rolled_back", "none"], row
    assert "read only" in result.stdout

    (verdict,) = LiveJudge(settings.gate, settings.kafka, registry, engine).step()

    assert verdict.action == "rolled_back"
    assert registry.roles() == {"champion": v1}  # the alias is back, the guard role ended
    assert registry.champion_history() == [v1]  # v2 is forgotten, as a manual rollback does
    bad = registry.info(v2, with_run=False).tags
    assert bad["live_decision"] == "rolled_back"
    assert bad["rolled_back_by"] == "flywheel-judge"
    evidence = json.loads(bad["live_evidence"])
    assert (evidence["labels"], evidence["decision"], evidence["action"]) == (
        300,
        "candidate",
        "rolled_back",
    )
    assert evidence["log_loss_difference"] < 0  # the guard was more confident where right
    assert registry.info(v1, with_run=False).tags["guard_end_reason"].endswith("-> rolled_back")

    events = [
        ModelEvent.model_validate_json(r.value)
        for r in read_topic(settings.kafka_bootstrap, settings.topic_model_events, at_least=5)
    ]
    kinds = [(e.kind, e.role, e.version) for e in events]
    assert kinds == [
        ("promoted", None, v2),
        ("role_changed", "guard", v1),
        ("rolled_back", None, v1),
        ("role_changed", "guard", "none"),
        ("live_decision", "guard", v1),
    ], kinds
    assert events[-1].evidence is not None and events[-1].evidence["action"] == "rolled_back"

    # decided once: a second step records nothing new (the guard is gone)
    assert LiveJudge(settings.gate, settings.kafka, registry, engine).step() == []


def test_the_leased_learner_runs_the_judge_every_interval(settings: Settings):
    """`OnlineLearner.judge_if_due`: the judge acts under the learner's lease, once per
    FLYWHEEL_LIVE_JUDGE_INTERVAL_S; without the lease it moves nothing."""
    from flywheel.learner import LearnerConfig, OnlineLearner
    from flywheel.store import LeaseLost

    upgrade(settings.resolved_database_url)
    engine = open_store(settings.resolved_database_url)
    registry = Registry.of(settings)
    v1 = _publish(registry, "")
    registry.set_champion(v1)
    v2 = _publish(registry, v1)
    registry.set_role(v2, "shadow", reason="try it", actor="ops")
    _outcomes(engine, registry.name, guard=v2, champion=v1)  # the shadow is better
    learner = OnlineLearner(LearnerConfig.of(settings), registry)
    with pytest.raises(LeaseLost):  # not holding the lineage's lease: nothing moves
        learner.judge_if_due(now=0.0)
    assert registry.roles() == {"champion": v1, "shadow": v2}
    assert learner.lease.try_take()
    try:
        assert learner.judge_if_due(now=0.5) is None  # the failed try counted: not due yet
        interval = settings.live_judge_interval_s
        (verdict,) = learner.judge_if_due(now=interval + 0.1) or []
        assert (verdict.role, verdict.action) == ("shadow", "promoted")
        assert registry.roles() == {"champion": v2, "guard": v1}  # FLYWHEEL_LIVE_GUARD
        assert registry.info(v2, with_run=False).tags["promoted_by"] == "flywheel-learner"
    finally:
        learner.lease.release()
