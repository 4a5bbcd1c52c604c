"""App keys: their format and hash, scopes, rotation grace, expiry, the key cache's TTL and
last-use writes (on a real SQLite store), and the service's 401/403 answers in-process."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta

import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.appkeys import (
    ForeignSource,
    InvalidKey,
    app_of,
    check_app_name,
    check_scopes,
    key_hash,
    new_key,
    parse_key,
    sign,
    signing_key,
    source_for,
    verify,
)
from flywheel.events import CorrectionEvent
from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings
from flywheel.store import (
    AppExists,
    AppKey,
    KeyBook,
    KeyRefused,
    UnknownApp,
    add_app,
    list_apps,
    make_engine,
    revoke_app,
    rotate_key,
    session_factory,
    upgrade,
)

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["cat", "dog"])
T0 = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)


class Clock:
    """Both clocks a KeyBook reads: monotonic seconds and wall time, moved together."""

    def __init__(self) -> None:
        self.s = 1000.0

    def mono(self) -> float:
        return self.s

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.s - 1000.0)

    def advance(self, seconds: float) -> None:
        self.s += seconds


@pytest.fixture()
def engine(sqlite_url):
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


def book(engine, clock: Clock, ttl_s: float = 30.0) -> KeyBook:
    return KeyBook(lambda: engine, ttl_s, clock=clock.mono, now=clock.now)


def make(engine, name: str = "shop", scopes: str = "predict,correct", **kw) -> str:
    with session_factory(engine).begin() as session:
        return add_app(session, name, scopes, **kw)


# -- the key itself ------------------------------------------------------------------------


def test_a_key_is_prefix_id_and_secret_and_only_its_sha256_is_stored(engine):
    key_id, key = new_key()
    assert key.startswith(f"fw_{key_id}_") and len(key) == 3 + 16 + 1 + 43
    assert parse_key(key) == (key_id, key[20:])
    assert key_hash(key) == hashlib.sha256(key.encode()).hexdigest()
    assert new_key()[1] != key  # random
    stored = make(engine)
    with session_factory(engine)() as session:
        row = session.get(AppKey, parse_key(stored)[0])
        assert row.key_hash == key_hash(stored) and stored not in (row.key_hash, row.signing_key)


@pytest.mark.parametrize(
    "text",
    ["", "fw_", "Bearer x", "fw_0123456789abcdeX_" + "a" * 43, "fw_0123456789abcdef_" + "a" * 42],
)
def test_anything_else_is_not_a_key(text):
    with pytest.raises(InvalidKey):
        parse_key(text)


def test_signatures_are_hmac_of_the_value_under_the_derived_secret():
    _, key = new_key()
    secret = signing_key(key)
    assert secret != key_hash(key)  # the stored hash cannot sign
    sig = sign(b"value", secret)
    assert sig.startswith("v1=") and verify(b"value", secret, sig)
    assert not verify(b"value!", secret, sig)
    assert not verify(b"value", signing_key(new_key()[1]), sig)


def test_scopes_and_names_are_checked():
    assert check_scopes("correct, predict") == ("predict", "correct")
    assert check_scopes(["admin"]) == ("admin",)
    for bad in ("", "predict,write", "root"):
        with pytest.raises(ValueError, match="choose from"):
            check_scopes(bad)
    assert check_app_name("shop-eu.2") == "shop-eu.2"
    for bad in ("Shop", "a/b", "", "x" * 33, "-a"):
        with pytest.raises(ValueError):
            check_app_name(bad)


def test_a_source_is_bound_to_its_apps_namespace():
    assert source_for("shop", None) == "shop" and source_for("shop", "shop") == "shop"
    assert source_for("shop", "eu") == "shop/eu" and source_for("shop", "shop/eu") == "shop/eu"
    with pytest.raises(ForeignSource, match="namespace of app 'bank'"):
        source_for("shop", "bank/eu")
    with pytest.raises(ValueError, match="longer than 64"):
        source_for("shop", "x" * 60)
    assert app_of("shop/eu") == app_of("shop") == "shop"


# -- the store and the cache ---------------------------------------------------------------


def test_create_list_and_duplicate_names(engine):
    make(engine, "shop", "correct,predict", expires_in_s=3600)
    with pytest.raises(AppExists), session_factory(engine).begin() as session:
        add_app(session, "shop", "predict")
    with session_factory(engine)() as session:
        (info,) = list_apps(session)
    assert info.name == "shop" and info.scopes == ("predict", "correct")
    assert len(info.keys) == 1 and info.keys[0].expires_at is not None
    assert info.as_json()["keys"][0]["last_used_at"] is None


def test_a_verified_key_is_cached_for_the_ttl_and_a_revocation_lands_within_it(engine):
    clock = Clock()
    keys = book(engine, clock, ttl_s=30)
    key = make(engine)
    for _ in range(50):
        identity = keys.check(key)
    assert identity.name == "shop" and identity.scopes == {"predict", "correct"}
    assert keys.reads == 1  # one store read for 50 checks
    with session_factory(engine).begin() as session:
        revoke_app(session, "shop")
    clock.advance(29)
    assert keys.check(key).name == "shop"  # still cached: within the TTL
    clock.advance(2)
    with pytest.raises(KeyRefused, match="revoked"):
        keys.check(key)
    assert keys.reads == 2


def test_wrong_unknown_and_malformed_keys_are_refused(engine):
    keys = book(engine, Clock())
    key = make(engine)
    key_id, _ = parse_key(key)
    with pytest.raises(KeyRefused, match="unknown or wrong"):
        keys.check(f"fw_{key_id}_" + "A" * 43)  # the right id, a wrong secret
    with pytest.raises(KeyRefused, match="unknown or wrong"):
        keys.check(new_key()[1])
    with pytest.raises(KeyRefused, match="not a Flywheel app key"):
        keys.check("hunter2")


def test_rotation_keeps_the_old_key_for_the_grace_period_then_refuses_it(engine):
    clock = Clock()
    keys = book(engine, clock, ttl_s=5)
    old = make(engine)
    with session_factory(engine).begin() as session:
        new = rotate_key(session, "shop", grace_s=3600, now=clock.now())
    assert keys.check(old).name == keys.check(new).name == "shop"
    clock.advance(3599)
    assert keys.check(old).name == "shop"
    clock.advance(2)
    with pytest.raises(KeyRefused, match="expired"):
        keys.check(old)
    assert keys.check(new).name == "shop"
    with session_factory(engine).begin() as session:
        rotate_key(session, "shop", grace_s=0, now=clock.now())  # ends `new` at once
    clock.advance(6)  # past the cache's TTL
    with pytest.raises(KeyRefused, match="expired"):
        keys.check(new)
    with pytest.raises(UnknownApp), session_factory(engine).begin() as session:
        rotate_key(session, "nobody")


def test_a_key_expires_exactly_at_its_time_even_while_cached(engine):
    clock = Clock()
    keys = book(engine, clock, ttl_s=3600)
    key = make(engine, expires_in_s=60, now=clock.now())
    assert keys.check(key).name == "shop"
    clock.advance(60)
    with pytest.raises(KeyRefused, match="expired"):
        keys.check(key)


def test_last_use_is_written_at_most_once_a_minute_per_key_by_flush(engine):
    clock = Clock()
    keys = book(engine, clock)
    key = make(engine)
    key_id, _ = parse_key(key)

    def last_used() -> datetime | None:
        with session_factory(engine)() as session:
            return session.get(AppKey, key_id).last_used_at

    keys.check(key)
    assert last_used() is None  # nothing on the request path
    assert keys.flush() == 1 and last_used() == clock.now()
    first = clock.now()
    clock.advance(30)
    keys.check(key)
    assert keys.flush() == 0 and last_used() == first
    clock.advance(31)
    keys.check(key)
    assert keys.flush() == 1 and last_used() == clock.now()


# -- the service ---------------------------------------------------------------------------


@pytest.fixture()
def service(tmp_path, list_event_log, app_key):
    """A service on `tmp_path` whose store has app `tests` (every scope)."""
    torch.manual_seed(0)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    sent: list = []
    log = list_event_log(sent)
    settings = Settings(home=tmp_path, admin_token="boot-admin-token-0123456789abcdef")
    with TestClient(create_app(ServiceConfig.of(settings), holder=holder, event_log=log)) as c:
        c.sent, c.log = sent, log
        yield c


def _with(client, scopes: str, name: str) -> dict[str, str]:
    engine = make_engine(f"sqlite:///{client.app.state.service.config.state.home_dir}/flywheel.db")
    try:
        with session_factory(engine).begin() as session:
            key = add_app(session, name, scopes)
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {key}"}


PREDICT = ("/v1/predict", {"instances": [[1, 2, 3]]})
CORRECT = ("/v1/corrections", {"corrections": [{"prediction_id": "p1", "label": "cat"}]})
INFER = (
    "/v2/models/m/infer",
    {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
)


@pytest.mark.parametrize(
    "headers,fragment",
    [
        ({}, "send an app key"),
        ({"Authorization": "Basic abc"}, "send an app key"),
        ({"Authorization": "Bearer nope"}, "not a Flywheel app key"),
        ({"Authorization": "Bearer " + new_key()[1]}, "unknown or wrong key"),
    ],
)
@pytest.mark.parametrize("route", [PREDICT, CORRECT, INFER])
def test_write_paths_refuse_a_missing_or_bad_key_with_401(service, headers, fragment, route):
    path, body = route
    r = service.post(path, json=body, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    message = r.json()["error" if path.startswith("/v2") else "detail"]
    assert fragment in message
    assert service.sent == []


def test_a_key_without_the_scope_gets_403_and_the_right_one_is_served(service, app_key):
    predict_only = _with(service, "predict", "reader")
    r = service.post(*CORRECT[:1], json=CORRECT[1], headers=predict_only)
    assert r.status_code == 403 and "lacks the 'correct' scope" in r.json()["detail"]
    r = service.post("/v1/review/rollback", json={"reason": "x"}, headers=predict_only)
    assert r.status_code == 403
    assert service.post(PREDICT[0], json=PREDICT[1], headers=predict_only).status_code == 200
    assert service.post(INFER[0], json=INFER[1], headers=predict_only).status_code == 200
    r = service.post(CORRECT[0], json=CORRECT[1], headers=app_key.headers)
    assert r.status_code == 202


def test_read_routes_stay_open(service):
    for path in ("/v1/model", "/healthz", "/readyz", "/metrics", "/openapi.json", "/v2"):
        assert service.get(path).status_code == 200, path
    assert service.get("/v1/review/config").json()["admin_enabled"] is True


def test_the_bootstrap_admin_token_has_the_admin_scope_only(service):
    admin = {"Authorization": "Bearer boot-admin-token-0123456789abcdef"}
    r = service.post(PREDICT[0], json=PREDICT[1], headers=admin)
    assert r.status_code == 403 and "lacks the 'predict' scope" in r.json()["detail"]
    # past the key check: the review action itself answers (no such version)
    r = service.post("/v1/review/versions/99/approve", json={"reason": "ok"}, headers=admin)
    assert r.status_code not in (401, 403), r.text


def test_corrections_take_the_apps_name_as_source_and_refuse_another_namespace(service, app_key):
    r = service.post(
        "/v1/corrections",
        json={
            "corrections": [
                {"prediction_id": "p1", "label": "cat"},
                {"prediction_id": "p2", "label": "dog", "source": "eu"},
                {"prediction_id": "p3", "label": "dog", "source": "tests/us"},
            ]
        },
        headers=app_key.headers,
    )
    assert r.status_code == 202
    assert service.log.wait_idle(5)
    events = [CorrectionEvent.model_validate_json(rec.value) for rec in service.sent]
    assert [e.source for e in events] == ["tests", "tests/eu", "tests/us"]
    # each record carries the app's signature, as a Kafka producer's would
    key_id, _ = parse_key(app_key.key)
    for rec in service.sent:
        headers = dict(rec.headers)
        assert headers["flywheel-key-id"] == key_id.encode()
        assert verify(rec.value, signing_key(app_key.key), headers["flywheel-signature"].decode())
    n = len(service.sent)
    r = service.post(
        "/v1/corrections",
        json={"corrections": [{"prediction_id": "p4", "label": "cat", "source": "shop/eu"}]},
        headers=app_key.headers,
    )
    assert r.status_code == 403 and "namespace of app 'shop'" in r.json()["detail"]
    assert len(service.sent) == n


def test_the_openapi_document_names_the_scheme_and_the_401_403_answers(service):
    doc = service.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["appKey"]["scheme"] == "bearer"
    for path in ("/v1/predict", "/v1/corrections", "/v2/models/{name}/infer"):
        op = doc["paths"][path]["post"]
        assert op["security"] == [{"appKey": []}]
        assert {"401", "403"} <= set(op["responses"]), path
    assert "security" not in doc["paths"]["/v1/model"]["get"]


def test_auth_off_says_so_at_start_up_and_keeps_the_body_source(tmp_path, list_event_log, caplog):
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("m", "7", SPEC, build_model(SPEC)))
    sent: list = []
    log = list_event_log(sent)
    settings = Settings(home=tmp_path, auth="off")
    with (
        caplog.at_level(logging.WARNING, logger="flywheel.service.app"),
        TestClient(create_app(ServiceConfig.of(settings), holder=holder, event_log=log)) as c,
    ):
        r = c.post(
            "/v1/corrections",
            json={"corrections": [{"prediction_id": "p1", "label": "cat", "source": "any"}]},
        )
        assert r.status_code == 202 and log.wait_idle(5)
    assert any("FLYWHEEL_AUTH=off" in m for m in caplog.messages)
    assert CorrectionEvent.model_validate_json(sent[0].value).source == "any"
    assert sent[0].headers == ()


def test_a_key_check_with_the_store_down_answers_503_not_500():
    """The fault suite's PostgreSQL kill: once a key's cached row is older than the TTL,
    its next check reads the store; with the store down that is a 503 a client retries
    (before: the driver's error escaped the middleware as a 500 with a traceback)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from flywheel.broker import free_port
    from flywheel.service.auth import AppKeys

    down = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    inner = Starlette(
        routes=[Route("/v1/predict", lambda _r: PlainTextResponse("ok"), methods=["POST"])]
    )
    book = KeyBook(lambda: down, 30.0)
    try:
        with TestClient(AppKeys(inner, book, None)) as client:
            r = client.post(
                "/v1/predict", json={}, headers={"Authorization": f"Bearer {new_key()[1]}"}
            )
    finally:
        down.dispose()
    assert r.status_code == 503, r.text
    assert "app keys cannot be checked: the store is unavailable" in r.json()["detail"]
