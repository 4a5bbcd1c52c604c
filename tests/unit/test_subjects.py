"""Data subjects: the keyed hash at intake (settings, the HTTP route, the Kafka contract),
the budget policy's words, and the once-an-hour account of excluded data."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.events import CorrectionEvent, correction_id, utcnow
from flywheel.feedback.messages import Rejected, decode
from flywheel.learner.exclusion import ExcludedData
from flywheel.modelspec import ModelSpec, build_model
from flywheel.privacy import BudgetPolicy
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings, SettingsError
from flywheel.subjects import subject_key

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
KEY = "s" * 40


def _client(tmp_path, list_event_log, app_key, **settings):
    torch.manual_seed(0)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    sent: list = []
    log = list_event_log(sent)
    app = create_app(
        ServiceConfig.of(Settings(home=tmp_path, **settings)), holder=holder, event_log=log
    )
    return TestClient(app, headers=app_key.headers), log, sent


def test_the_service_logs_only_the_keyed_hash_of_a_subject(tmp_path, list_event_log, app_key):
    client, log, sent = _client(tmp_path, list_event_log, app_key, subject_key=KEY)
    with client:
        r = client.post(
            "/v1/corrections",
            json={
                "corrections": [
                    {"prediction_id": "p1", "label": "dog", "subject": "alice@example.com"},
                    {"prediction_id": "p2", "label": "cat"},
                ]
            },
        )
        assert r.status_code == 202, r.text
        assert log.wait_idle(5)
    assert len(sent) == 2 and not any(b"alice" in rec.value for rec in sent)
    first, second = (CorrectionEvent.model_validate_json(rec.value) for rec in sent)
    assert first.subject == subject_key("alice@example.com", KEY)
    assert second.subject is None
    # the id is the same with or without a subject: a retry is one correction
    assert first.id == correction_id("p1", "dog", app_key.name)


def test_a_subject_without_a_platform_key_is_refused(tmp_path, list_event_log, app_key):
    client, log, sent = _client(tmp_path, list_event_log, app_key)
    body = {"corrections": [{"prediction_id": "p1", "label": "dog", "subject": "u-1"}]}
    with client:
        r = client.post("/v1/corrections", json=body)
        assert r.status_code == 422
        assert "FLYWHEEL_SUBJECT_KEY" in r.json()["detail"]
        long = {"corrections": [{"prediction_id": "p1", "label": "dog", "subject": "x" * 257}]}
        assert client.post("/v1/corrections", json=long).status_code == 422
        assert log.wait_idle(5)
    assert sent == []


@pytest.mark.parametrize("key", ["short", "x" * 31])
def test_a_short_subject_key_is_refused(tmp_path, key):
    with pytest.raises((SettingsError, ValueError), match="at least 32 characters"):
        Settings(home=tmp_path, subject_key=key)


def test_a_blank_subject_key_is_unset(tmp_path):
    assert Settings(home=tmp_path, subject_key="  ").subject_key is None


def test_a_raw_subject_on_kafka_is_dead_lettered_with_the_reason():
    value = (
        b'{"schema_version": 1, "id": "c1", "prediction_id": "p1", "label": "dog",'
        b' "timestamp": "2026-01-01T00:00:00Z", "subject": "alice@example.com"}'
    )
    out = decode("correction", "t", 0, 0, b"p1", value)
    assert isinstance(out, Rejected)
    assert "subject: must be the subject's keyed hash" in out.reason
    hashed = value.replace(b"alice@example.com", subject_key("alice", KEY).encode())
    event = decode("correction", "t", 0, 1, b"p1", hashed)
    assert isinstance(event, CorrectionEvent) and event.subject == subject_key("alice", KEY)


def test_a_correction_stored_with_another_subject_is_a_conflict():
    from flywheel.feedback.messages import content_of, duplicate_reason

    a = CorrectionEvent(
        id="c1", prediction_id="p1", label="dog", timestamp=utcnow(), subject="a" * 64
    )
    b = a.model_copy(update={"subject": "b" * 64})
    assert duplicate_reason(a, content_of(a), "x") is None
    assert "subject" in (duplicate_reason(b, content_of(a), "x") or "")


def test_the_policies_say_what_they_promise_over_a_year():
    lifetime = BudgetPolicy("lifetime", 3.0, 1e-5, 30.0)
    assert lifetime.since(utcnow()) is None and lifetime.year_epsilon() == 3.0
    assert "whole life" in lifetime.statement() and "ε = 3" in lifetime.statement()
    renewing = BudgetPolicy("renewing", 3.0, 1e-5, 30.0)
    assert renewing.windows_a_year() == 13 and renewing.year_epsilon() == 39.0
    words = renewing.statement()
    assert "any 30 days" in words and "ε = 39" in words and "36.5" in words
    assert renewing.tags() == {"dp_budget_policy": "renewing", "dp_budget_period_days": "30"}
    # a period that divides the year: exactly that many windows
    assert BudgetPolicy("renewing", 1.0, 1e-5, 73.0).windows_a_year() == 5


def test_excluded_data_is_told_once_an_hour_with_the_hours_numbers():
    now = [0.0]
    lines: list[str] = []
    seen = ExcludedData("m:online", clock=lambda: now[0], say=lines.append)
    seen.add(incoming=100, excluded=0, units=0)
    assert lines == []  # nothing excluded: nothing to tell
    seen.add(incoming=100, excluded=30, units=2)
    assert len(lines) == 1 and "30 of 200" in lines[0]  # since the start
    for _ in range(50):  # an update a minute for 50 minutes: counted, not told
        now[0] += 60
        seen.add(incoming=100, excluded=10, units=1)
    assert len(lines) == 1
    now[0] += 600  # past the hour: one line with everything since the last
    seen.add(incoming=100, excluded=10, units=1)
    assert len(lines) == 2 and "510 of 5100" in lines[1] and "in the last hour" in lines[1]
    assert seen.state() == {"incoming": 5300, "excluded": 540}
    restored = ExcludedData("m:online")
    restored.restore(seen.state())
    assert restored.state() == seen.state()
