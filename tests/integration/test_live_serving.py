"""Shadow and canary on real parts (issue 28): the production app under uvicorn follows a
SQLite MLflow registry; `flywheel models shadow` / `canary` set the roles and announce them
on the real broker; the service answers from the champion or (for the routing keys in the
canary's share) the canary, and the shadow's and the paired champion's scores arrive on
the scores topic, keyed by prediction id, for exactly the rows they should."""

from __future__ import annotations

import os

import httpx
import pytest
import torch
from typer.testing import CliRunner

from flywheel.broker import ensure_topics, read_topic
from flywheel.cli import app, register_commands
from flywheel.events import ModelEvent, PredictionEvent, ScoreEvent
from flywheel.learner import default_spec
from flywheel.modelspec import build_model
from flywheel.registry import Registry
from flywheel.service import ROUTING_HEADER
from flywheel.service.live import in_share
from flywheel.settings import Settings
from tests.deadlines import deadline

from .conftest import consume
from .test_hot_swap import ROWS, SWAP_S, TAGS, publish_variant, serving, wait_for

pytestmark = pytest.mark.integration
register_commands()
SHARE = 0.5  # both shares: about half the keys and half the rows, so both sides show


@pytest.fixture()
def live_settings(settings: Settings, topics_suffix: str, monkeypatch) -> Settings:
    """The test's settings with a scores topic of its own, 50 % shares, a slow poll (the
    events must do it), and an environment for the CLI pointing at the same home."""
    s = settings.model_copy(
        update={
            "topic_scores": f"scores-{topics_suffix}",
            "live_shadow_share": SHARE,
            "live_canary_share": SHARE,
            "registry_poll_s": 60.0,
        }
    )
    ensure_topics(s.kafka_bootstrap, [s.topic_scores], s.topic_partitions)
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    for key, value in {
        "HOME": s.home,
        "KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "TOPIC_MODEL_EVENTS": s.topic_model_events,
    }.items():
        monkeypatch.setenv(f"FLYWHEEL_{key}", str(value))
    return s


def roles(url: str) -> dict[str, str]:
    try:
        doc = httpx.get(f"{url}/v1/model", timeout=5).json()
    except httpx.TimeoutException:
        return {}
    return {role: held["version"] for role, held in doc["roles"].items()}


def test_champion_shadow_and_canary_answer_and_score(live_settings: Settings):
    s = live_settings
    registry = Registry.of(s)
    torch.manual_seed(0)
    spec = default_spec()
    v1 = registry.publish(spec, build_model(spec), tags={"parent_version": "", **TAGS})
    registry.set_champion(v1)
    v2 = publish_variant(registry, v1, seed=1)
    v3 = publish_variant(registry, v1, seed=2)
    runner = CliRunner()
    with serving(s) as svc:
        assert svc.follower.wait_listening(30) and svc.follower.wait_idle(30)
        assert roles(svc.url) == {"champion": v1}
        for role, version in (("shadow", v2), ("canary", v3)):
            result = runner.invoke(app, ["models", role, version, "--reason", "live test"])
            assert result.exit_code == 0, result.output
            assert f"announced on {s.topic_model_events}" in result.stdout
        # followed on the events (the poll is 60 s away)
        assert wait_for(
            lambda: roles(svc.url) == {"champion": v1, "shadow": v2, "canary": v3}, SWAP_S
        ), roles(svc.url)
        info = httpx.get(f"{svc.url}/v1/model", timeout=5).json()["roles"]
        assert (info["canary"]["share"], info["shadow"]["share"]) == (SHARE, SHARE)

        answered: dict[str, str] = {}  # prediction id -> version that answered
        for i in range(40):
            key = f"customer-{i}"
            r = httpx.post(
                f"{svc.url}/v1/predict",
                json={"instances": ROWS[:2]},
                headers={**svc.headers, ROUTING_HEADER: key},
                timeout=deadline(10),
            )
            assert r.status_code == 200, r.text
            version = r.json()["model"]["version"]
            assert version == (v3 if in_share(key, SHARE) else v1), key  # sticky by key
            answered |= {p["id"]: version for p in r.json()["predictions"]}
        canary_rows = {i for i, v in answered.items() if v == v3}
        sampled = {i for i in answered if in_share(i, SHARE)}
        assert canary_rows and len(canary_rows) < len(answered) and sampled

        # every prediction is logged with the version that answered it
        preds = consume(s.kafka_bootstrap, s.topic_predictions, len(answered))
        got = {
            e.id: e.model_version
            for e in (PredictionEvent.model_validate_json(v) for _, v in preds)
        }
        assert got == answered
        # the champion scored every canary row; the shadow the sampled rows, whoever answered
        expected = {(i, v1, "champion") for i in canary_rows} | {(i, v2, "shadow") for i in sampled}
        records = consume(s.kafka_bootstrap, s.topic_scores, len(expected))
        scores = [(k, ScoreEvent.model_validate_json(v)) for k, v in records]
        assert all(k == e.prediction_id.encode() for k, e in scores)
        assert {(e.prediction_id, e.model_version, e.role) for _, e in scores} == expected
        assert len(scores) == len(expected)
        metrics = httpx.get(f"{svc.url}/metrics", timeout=5).text
        assert f'flywheel_canary_answers_total{{model_version="{v3}"}} {len(canary_rows)}.0' in (
            metrics
        )

        # the shadow stopped: unloaded on the event; the canary stays
        result = runner.invoke(app, ["models", "shadow", "--stop", "--reason", "seen enough"])
        assert result.exit_code == 0, result.output
        assert wait_for(lambda: roles(svc.url) == {"champion": v1, "canary": v3}, SWAP_S)

    events = [
        ModelEvent.model_validate_json(r.value)
        for r in read_topic(s.kafka_bootstrap, s.topic_model_events, at_least=3)
    ]
    assert [(e.kind, e.role, e.version, e.previous_version) for e in events] == [
        ("role_changed", "shadow", v2, None),
        ("role_changed", "canary", v3, None),
        ("role_changed", "shadow", "none", v2),
    ]
