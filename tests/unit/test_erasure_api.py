"""`POST /v1/admin/forget` in-process on a real SQLite store: the admin scope (401 without
a key, 403 without the scope, the review scope included), bad bodies refused with the
service's error body, no FLYWHEEL_SUBJECT_KEY refused, and an erasure through the API that
deletes the subject's rows only and answers the receipt (never the raw id)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings
from flywheel.store import (
    Correction,
    ErasureReceipt,
    Example,
    Prediction,
    add_app,
    make_engine,
    session_factory,
)
from flywheel.subjects import privacy_unit, subject_key

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
KEY = "erasure-test-subject-key-0123456789abcdef"
RAW, OTHER = "alice@example.com", "bob@example.com"
T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
FORGET = "/v1/admin/forget"


def _client(tmp_path, list_event_log, subject_key_set: bool = True):
    torch.manual_seed(0)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    settings = Settings(home=tmp_path, subject_key=KEY if subject_key_set else None)
    return TestClient(
        create_app(ServiceConfig.of(settings), holder=holder, event_log=list_event_log([]))
    )


def _engine(tmp_path):
    return make_engine(f"sqlite:///{tmp_path}/flywheel.db")


def _key(tmp_path, name: str, scopes: str) -> dict[str, str]:
    engine = _engine(tmp_path)
    try:
        with session_factory(engine).begin() as session:
            key = add_app(session, name, scopes)
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {key}"}


def _fill(tmp_path) -> None:
    """One prediction, correction and example for each of two subjects."""
    engine = _engine(tmp_path)
    try:
        with session_factory(engine).begin() as session:
            for i, raw in enumerate((RAW, OTHER)):
                h = subject_key(raw, KEY)
                pid = f"p{i}"
                session.add(
                    Prediction(
                        id=pid,
                        model_name="m",
                        model_version="7",
                        features=[1.0, 2.0, 3.0],
                        probabilities={"cat": 0.6, "dog": 0.4},
                        label="cat",
                        created_at=T0,
                        latency_ms=1.0,
                    )
                )
                session.add(
                    Correction(id=f"c{i}", prediction_id=pid, label="dog", subject=h, created_at=T0)
                )
                session.add(
                    Example(
                        dedup_key=f"correction:c{i}",
                        origin="correction",
                        parent_prediction_id=pid,
                        features=[1.0, 2.0, 3.0],
                        label="dog",
                        split="train",
                        privacy_unit=privacy_unit(h, pid),
                    )
                )
    finally:
        engine.dispose()


def _counts(tmp_path) -> tuple[int, int, int, int]:
    engine = _engine(tmp_path)
    try:
        with session_factory(engine)() as session:
            return tuple(  # type: ignore[return-value]
                session.scalar(select(func.count()).select_from(m))
                for m in (Prediction, Correction, Example, ErasureReceipt)
            )
    finally:
        engine.dispose()


@pytest.fixture()
def client(tmp_path, list_event_log, app_key):
    with _client(tmp_path, list_event_log) as c:
        yield c


@pytest.mark.parametrize("scopes", ["predict,correct", "review", "predict,correct,review"])
def test_forget_needs_the_admin_scope(client, tmp_path, scopes):
    _fill(tmp_path)
    answer = client.post(FORGET, json={"subject": RAW})
    assert answer.status_code == 401 and "detail" in answer.json()
    answer = client.post(FORGET, json={"subject": RAW}, headers=_key(tmp_path, "noadmin", scopes))
    assert answer.status_code == 403, answer.text
    assert "admin" in answer.json()["detail"]
    assert _counts(tmp_path) == (2, 2, 2, 0)  # nothing deleted, no receipt


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({}, "subject"),
        ({"subject": ""}, "subject"),
        ({"subject": "x" * 257}, "subject"),
        ({"subject": "a\x00b"}, "subject"),
        ({"subject": 17}, "subject"),
        ({"subject": RAW, "also": 1}, "also"),
        ([RAW], "dict"),
    ],
)
def test_forget_refuses_bad_bodies(client, tmp_path, app_key, body, fragment):
    _fill(tmp_path)
    answer = client.post(FORGET, json=body, headers=app_key.headers)
    assert answer.status_code == 422, answer.text
    assert fragment in answer.text
    assert _counts(tmp_path) == (2, 2, 2, 0)


def test_forget_refuses_a_body_not_sent_as_json(client, tmp_path, app_key):
    answer = client.post(
        FORGET,
        content=b'{"subject": "x"}',
        headers={**app_key.headers, "content-type": "text/plain"},
    )
    assert answer.status_code == 415, answer.text
    answer = client.post(
        FORGET,
        content=b"{not json",
        headers={**app_key.headers, "content-type": "application/json"},
    )
    assert answer.status_code in (400, 422), answer.text


def test_forget_without_a_subject_key_is_refused(tmp_path, list_event_log, app_key):
    with _client(tmp_path, list_event_log, subject_key_set=False) as c:
        answer = c.post(FORGET, json={"subject": RAW}, headers=app_key.headers)
    assert answer.status_code == 409, answer.text
    assert "FLYWHEEL_SUBJECT_KEY" in answer.json()["detail"]
    assert _counts(tmp_path)[3] == 0


def test_forget_erases_one_subject_and_answers_the_receipt(client, tmp_path, app_key):
    _fill(tmp_path)
    answer = client.post(FORGET, json={"subject": f"  {RAW} "}, headers=app_key.headers)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["subject"] == subject_key(RAW, KEY) and RAW not in answer.text
    assert doc["deleted"] == {
        "corrections": 1,
        "predictions": 1,
        "examples": 1,
        "scores": 0,
        "outcomes": 0,
    }
    assert doc["requested_by"] == "app:tests" and doc["repeated"] is False
    assert _counts(tmp_path) == (1, 1, 1, 1)
    engine = _engine(tmp_path)
    with session_factory(engine)() as session:
        assert session.scalars(select(Correction.subject)).all() == [subject_key(OTHER, KEY)]
    engine.dispose()
    again = client.post(FORGET, json={"subject": RAW}, headers=app_key.headers).json()
    assert again["deleted"] == {
        "corrections": 0,
        "predictions": 0,
        "examples": 0,
        "scores": 0,
        "outcomes": 0,
    }
    assert again["repeated"] is True and again["receipt"] != doc["receipt"]
    assert _counts(tmp_path) == (1, 1, 1, 2)


def test_forget_is_in_the_openapi_with_its_error_bodies(client):
    op = client.get("/openapi.json").json()["paths"][FORGET]["post"]
    assert {"401", "403", "409", "415", "422", "503"} <= set(op["responses"])
    assert op["responses"]["403"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ErrorBody"
    )


def _cli(tmp_path, *args: str, key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["FLYWHEEL_HOME"] = str(tmp_path)
    if key is not None:
        env["FLYWHEEL_SUBJECT_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "flywheel", "privacy", "forget", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_forget_refuses_without_a_key_or_with_a_bad_id_and_erases_with_one(tmp_path, app_key):
    _fill(tmp_path)
    refused = _cli(tmp_path, "--subject", RAW, key=None)
    assert refused.returncode == 2 and "FLYWHEEL_SUBJECT_KEY is unset" in refused.stderr
    bad = _cli(tmp_path, "--subject", "a\x01b", key=KEY)
    assert bad.returncode == 2 and "--subject" in bad.stderr
    assert _counts(tmp_path) == (2, 2, 2, 0)
    done = _cli(tmp_path, "--subject", RAW, key=KEY)
    assert done.returncode == 0, done.stderr
    assert "1 corrections, 1 predictions, 1 examples" in done.stdout and RAW not in done.stdout
    assert _counts(tmp_path) == (1, 1, 1, 1)
