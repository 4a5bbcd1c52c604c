"""`/v1/review/...` and `/ui` on the in-process app: what the page reads, and who may act.

Admin actions need `Authorization: Bearer <FLYWHEEL_ADMIN_TOKEN>`: none configured is 403
(read-only), a missing or wrong token 401; every input is validated before the registry moves.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import Registry
from flywheel.service import (
    EventLog,
    ModelHolder,
    ServedModel,
    ServiceConfig,
    Spool,
    create_app,
)
from flywheel.settings import Settings, prepare_home

SPEC = ModelSpec(input_dim=3, hidden=[4], labels=["a", "b"])
TOKEN = "s3cret-token-0123456789abcdef01234"
PASSED = "passed: better on recent data; recent 0.810 vs 0.620 (n=40)"


class NullSink:
    def send(self, records, timeout_s):
        return [True] * len(records)

    def close(self):
        pass


def _publish(
    registry: Registry, parent: str, source: str, epsilon: str = "none", gate: str = PASSED
) -> str:
    return registry.publish(
        SPEC,
        build_model(SPEC),
        tags={
            "parent_version": parent,
            "source": source,
            "examples": "[0,100)",
            "epsilon": epsilon,
            "delta": "none" if epsilon == "none" else "1e-05",
            "gate": gate,
        },
        metrics={"gate_passed": 1.0, "gate_recent_candidate": 0.81, "gate_trusted_candidate": 0.95},
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """v1 seed, v2 champion, v3 and v4 pending review (v4 with ε)."""
    home = tmp_path_factory.mktemp("review-api") / "home"
    settings = Settings(home=home)
    prepare_home(settings)
    registry = Registry.of(settings)
    v1 = _publish(registry, "", "manual", gate="initial: no champion to compare")
    registry.set_champion(v1)
    v2 = _publish(registry, v1, "online")
    registry.promote(v2, reason="gate passed", actor="flywheel-learner")
    for parent, eps in ((v2, "none"), (v2, "1.5")):
        registry.set_tags(_publish(registry, parent, "online", eps), {"review": "pending"})
    return home


def _client(template: Path, tmp_path: Path, token: str | None) -> TestClient:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    # the admin token's own rules, as with FLYWHEEL_AUTH=off (app keys: tests/unit/test_auth.py)
    settings = Settings(home=home, admin_token=token, auth="off")
    torch.manual_seed(0)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare("flywheel", "2", SPEC, build_model(SPEC)))
    log = EventLog(lambda: NullSink(), Spool(tmp_path / "spool", fsync=False))
    return TestClient(create_app(ServiceConfig.of(settings), holder=holder, event_log=log))


@pytest.fixture()
def admin(template, tmp_path):
    with _client(template, tmp_path / "admin", TOKEN) as c:
        c.registry = Registry.of(Settings(home=tmp_path / "admin" / "home"))
        yield c


@pytest.fixture()
def readonly(template, tmp_path):
    with _client(template, tmp_path / "readonly", None) as c:
        c.registry = Registry.of(Settings(home=tmp_path / "readonly" / "home"))
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_the_page_and_its_files_are_served_self_contained(readonly):
    r = readonly.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = readonly.get("/ui/")
    assert page.status_code == 200 and "Flywheel review" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = readonly.get(f"/ui/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    text = page.text + readonly.get("/ui/app.js").text + readonly.get("/ui/style.css").text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text, "no CDN: the page must work offline"


def test_config_says_whether_admin_actions_exist(readonly, admin):
    assert readonly.get("/v1/review/config").json()["admin_enabled"] is False
    assert admin.get("/v1/review/config").json() == {
        "model_name": "flywheel",
        "admin_enabled": True,
        "auto_promote": True,
        "registry_poll_s": 10.0,
    }
    assert TOKEN not in admin.get("/v1/review/config").text


def test_versions_timeline_has_gate_results_and_review_state(readonly):
    doc = readonly.get("/v1/review/versions").json()
    assert doc["champion"] == "2" and doc["total"] == 4
    by = {v["version"]: v for v in doc["versions"]}
    assert list(by) == ["4", "3", "2", "1"]
    assert by["2"]["champion"] and by["2"]["promoted_by"] == "flywheel-learner"
    assert by["3"]["status"] == "pending review" and by["3"]["gate_passed"] is True
    assert by["3"]["gate_numbers"]["gate_recent_candidate"] == 0.81
    assert by["4"]["epsilon_value"] == 1.5 and by["1"]["epsilon_value"] is None
    assert readonly.get("/v1/review/versions?limit=2").json()["versions"][0]["version"] == "4"
    assert readonly.get("/v1/review/versions?limit=0").status_code == 422


def test_pending_errors_and_privacy_read_without_a_store(readonly):
    assert [p["version"] for p in readonly.get("/v1/review/pending").json()["pending"]] == [
        "3",
        "4",
    ]
    errors = readonly.get("/v1/review/errors?hours=24").json()
    assert errors["available"] is False and "no training store" in errors["note"]
    assert readonly.get("/v1/review/errors?hours=-1").status_code == 422
    privacy = readonly.get("/v1/review/privacy").json()
    assert [v["epsilon"] for v in privacy["versions"]] == ["none", "none", "none", "1.5"]
    assert privacy["ledger"]["available"] is False and privacy["ledger"]["note"]


def test_without_a_configured_token_admin_actions_are_forbidden(readonly):
    for path in (
        "/v1/review/versions/3/approve",
        "/v1/review/versions/3/reject",
        "/v1/review/rollback",
    ):
        r = readonly.post(path, json={"reason": "ok"}, headers=AUTH)
        assert r.status_code == 403, path
        assert "FLYWHEEL_ADMIN_TOKEN" in r.json()["detail"]
    assert readonly.registry.champion_version() == "2"


@pytest.mark.parametrize(
    "headers,detail",
    [
        ({}, "Authorization: Bearer"),
        ({"Authorization": TOKEN}, "Authorization: Bearer"),
        ({"Authorization": "Basic " + TOKEN}, "Authorization: Bearer"),
        ({"Authorization": "Bearer wrong"}, "wrong admin token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong admin token"),
    ],
)
def test_a_missing_or_wrong_token_is_unauthorized(admin, headers, detail):
    r = admin.post("/v1/review/versions/3/approve", json={"reason": "ok"}, headers=headers)
    assert r.status_code == 401 and detail in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert admin.registry.champion_version() == "2"


@pytest.mark.parametrize(
    "path,body,status,detail",
    [
        ("/v1/review/versions/42/approve", {"reason": "ok"}, 404, "no version '42'"),
        ("/v1/review/versions/abc/approve", {"reason": "ok"}, 422, "version"),
        ("/v1/review/versions/0/approve", {"reason": "ok"}, 422, "version"),
        ("/v1/review/versions/3/approve", {"reason": "   "}, 422, "reason"),
        ("/v1/review/versions/3/approve", {}, 422, "reason: field required"),
        ("/v1/review/versions/3/approve", {"reason": "x" * 1001}, 422, "reason"),
        ("/v1/review/versions/3/approve", {"reason": "ok\u0000"}, 422, "control character"),
        ("/v1/review/versions/3/approve", {"reason": "ok", "extra": 1}, 422, "extra"),
        ("/v1/review/versions/3/approve", {"reason": "ok", "by": "<script>"}, 422, "by"),
        ("/v1/review/versions/1/approve", {"reason": "ok"}, 409, "not pending review"),
        ("/v1/review/versions/2/reject", {"reason": "ok"}, 409, "already the champion"),
    ],
)
def test_inputs_are_validated_before_anything_moves(admin, path, body, status, detail):
    r = admin.post(path, json=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"]
    assert admin.registry.champion_version() == "2"


@pytest.mark.parametrize("content_type", [None, "text/plain", "multipart/form-data"])
@pytest.mark.parametrize(
    "path", ["/v1/review/versions/4/approve", "/v1/review/versions/4/reject", "/v1/review/rollback"]
)
def test_admin_posts_need_a_json_content_type(admin, path, content_type):
    headers = dict(AUTH) | ({} if content_type is None else {"content-type": content_type})
    request = admin.build_request("POST", path, content=b'{"reason": "ok"}', headers=headers)
    assert request.headers.get("content-type") == content_type  # httpx adds none for bytes
    r = admin.send(request)
    assert r.status_code == 415, r.text
    assert "Content-Type: application/json" in r.json()["detail"]
    assert admin.registry.champion_version() == "2"
    template = path.replace("/4/", "/{version}/")
    documented = admin.get("/openapi.json").json()["paths"][template]["post"]["responses"]
    assert {"401", "403", "415", "422"} <= set(documented)


def test_approve_moves_the_champion_and_records_the_review(admin):
    r = admin.post(
        "/v1/review/versions/v4/approve",
        headers=AUTH,
        json={"reason": "ε within budget", "by": "alice"},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "approved": "4",
        "champion": "4",
        "previous": "2",
        "by": "alice",
        "reason": "ε within budget",
    }
    assert admin.registry.champion_version() == "4"
    tags = admin.registry.info("4", with_run=False).tags
    assert (tags["review"], tags["review_by"], tags["review_reason"]) == (
        "approved",
        "alice",
        "ε within budget",
    )
    assert tags["promoted_by"] == "alice"
    assert [p["version"] for p in admin.get("/v1/review/pending").json()["pending"]] == ["3"]


def test_reject_and_rollback(admin):
    r = admin.post("/v1/review/versions/3/reject", headers=AUTH, json={"reason": "too noisy"})
    assert r.status_code == 200 and r.json()["by"] == "review-ui"
    assert admin.registry.info("3", with_run=False).tags["review"] == "rejected"
    assert admin.registry.champion_version() == "2"
    r = admin.post("/v1/review/rollback", headers=AUTH, json={"reason": "p99 regressed"})
    assert r.status_code == 200, r.text
    assert (r.json()["rolled_back"], r.json()["champion"]) == ("2", "1")
    assert admin.registry.champion_version() == "1"
    r = admin.post("/v1/review/rollback", headers=AUTH, json={"reason": "again"})
    assert r.status_code == 409 and "no earlier champion" in r.json()["detail"]
