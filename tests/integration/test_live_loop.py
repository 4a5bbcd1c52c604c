"""Live evaluation end to end (issue 28): a planted worse champion is rolled back on live
paired traffic, and every correction is credited exactly to the versions that scored its
prediction, across the hot swap the rollback makes and a restart of the service replica.

The real loop on the session's Kafka-protocol broker, a real MLflow store and the training
store (SQLite and PostgreSQL): `flywheel init` on a CSV with named features makes v1; a v2
with untrained weights (the same schema) is promoted the way the learner promotes (with
FLYWHEEL_LIVE_GUARD, v1 becomes its guard). The service answers with v2 and scores every
request with the guard v1 off the request path (share 1.0); the app sends the truth for
every prediction; the feedback worker credits the outcomes; the learner's live judge
(every 0.5 s; the learner never trains: its batch is larger than the test) rolls v2 back
and the service swaps to v1. Then the replica is stopped and a new one started on the same
home, and traffic goes on.
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from sqlalchemy import select
from typer.testing import CliRunner

from flywheel.cli import app, register_commands
from flywheel.client import Client
from flywheel.demo import demo_api_key, embedded_stack
from flywheel.demo.loop import running_feedback_worker, running_learner, running_service
from flywheel.modelspec import build_model
from flywheel.promotion import promote
from flywheel.registry import Registry
from flywheel.settings import Settings
from flywheel.store import Outcome, Score, make_engine, session_factory

from .test_named_loop import COUNTRIES, rows, truth, wait_until, write_csv

pytestmark = pytest.mark.integration
register_commands()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def _served(url: str) -> dict:
    return httpx.get(f"{url}/v1/model", timeout=10).json()


def _send(fw: Client, n: int, seed: int) -> dict[str, str]:
    """`n` named rows predicted and corrected with their truth; prediction id -> the
    version that answered it."""
    asked = rows(n, seed, COUNTRIES)
    result = fw.predict(asked)
    answered = {p.id: p.model.version for p in result.predictions}
    accepted = fw.correct(
        [(p.id, truth(**r)) for p, r in zip(result.predictions, asked, strict=True)]
    )
    assert accepted == n
    return answered


def test_a_worse_champion_is_rolled_back_and_attribution_stays_exact(tmp_path, settings, db_url):
    s: Settings = settings.model_copy(
        update={
            "database_url": db_url,
            "port": 0,
            "learn_batch": 1_000_000,  # the learner only judges here
            "learn_poll_s": 0.2,
            "live_shadow_share": 1.0,
            "live_judge_interval_s": 0.5,
            "privacy_enabled": False,
        }
    )
    env = {
        "FLYWHEEL_HOME": str(s.home_dir),
        "FLYWHEEL_DATABASE_URL": db_url,
        "FLYWHEEL_MLFLOW_TRACKING_URI": s.resolved_mlflow_uri,
    }
    data = write_csv(tmp_path / "transactions.csv")
    out = CliRunner().invoke(
        app, ["init", "--data", str(data), "--label", "fraud", "--public", "--json"], env=env
    )
    assert out.exit_code == 0, out.stderr
    registry = Registry.of(s)
    v1 = registry.champion_version()
    assert v1 is not None
    spec = registry.load(v1).spec
    torch.manual_seed(0)
    v2 = registry.publish(
        spec,
        build_model(spec),  # untrained: worse than v1 on the same schema
        tags={
            "parent_version": v1,
            "source": "manual",
            "examples": "[0,0)",
            "epsilon": "none",
            "delta": "none",
            "gate": "passed: planted by the test",
        },
    )
    answered: dict[str, str] = {}
    with embedded_stack(s) as s:
        promote(s.kafka, v2, reason="planted", registry=registry, gate="passed: test", guard=True)
        assert registry.roles() == {"champion": v2, "guard": v1}
        with running_feedback_worker(s) as worker, running_learner(s):
            with running_service(s) as url, Client(url, api_key=demo_api_key(s)) as fw:
                fw.wait_ready(60)
                roles = wait_until(
                    "the service to run v2 with its guard v1",
                    lambda: (r := _served(url)["roles"]).get("guard") and r,
                )
                assert roles["champion"]["version"] == v2
                assert roles["guard"]["version"] == v1
                # phase A: v2 answers, v1 scores every request off the path
                for seed in range(10, 16):
                    answered |= _send(fw, 50, seed)
                    if registry.champion_version() == v1:
                        break
                wait_until(
                    "the live judge to roll v2 back", lambda: registry.champion_version() == v1
                )
                wait_until("the service to swap back to v1", lambda: fw.model().version == v1)
                assert "guard" not in _served(url)["roles"]
                # phase B: v1 answers alone
                answered |= _send(fw, 60, 20)
            # phase C: a new replica on the same home
            with running_service(s) as url, Client(url, api_key=demo_api_key(s)) as fw:
                fw.wait_ready(60)
                assert fw.model().version == v1
                answered |= _send(fw, 60, 21)
            wait_until(
                "every correction joined",
                lambda: worker.stats.joined >= len(answered),
            )

            engine = make_engine(s.resolved_database_url)

            def credited() -> tuple[set, set, set] | None:
                with session_factory(engine)() as session:
                    outcomes = set(
                        session.execute(
                            select(Outcome.prediction_id, Outcome.model_version, Outcome.answered)
                        ).all()
                    )
                    scores = set(
                        session.execute(select(Score.prediction_id, Score.model_version)).all()
                    )
                expected = {(p, v, True) for p, v in answered.items()} | {
                    (p, v, False) for p, v in scores
                }
                return (outcomes, scores, expected) if outcomes == expected else None

            try:
                outcomes, scores, expected = wait_until("outcomes credited exactly", credited)
            finally:
                engine.dispose()

    by_v2 = {p for p, v in answered.items() if v == v2}
    assert by_v2 and {p for p, v in answered.items() if v == v1}
    # the guard scored what v2 answered (share 1.0), and nothing else
    assert {v for _, v in scores} == {v1}
    assert {p for p, _ in scores} <= by_v2
    assert len(scores) >= 0.9 * len(by_v2)
    # one answered outcome per corrected prediction, by the version that answered it
    assert sum(1 for *_, a in outcomes if a) == len(answered)
    # the decision and its evidence are on the version
    tags = registry.info(v2).tags
    assert tags["live_decision"] == "rolled_back"
    evidence = json.loads(tags["live_evidence"])
    assert evidence["candidate_only_right"] > evidence["champion_only_right"]
