"""The review page in a real browser: Debian's headless Chromium driven by Playwright.

The production app (`create_app(ServiceConfig.of(settings))`: registry follower, Kafka event
log on the test broker) runs under uvicorn in a thread over a seeded SQLite MLflow registry.
The page must show the versions, refuse a wrong token, and an approve click with the right
token must move the `champion` alias -- and, through the model event, what the service serves.

Playwright never downloads a browser here: it launches /usr/bin/chromium. Without Chromium
or Playwright the test skips locally and fails under CI=true (`make test` installs Chromium).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from flywheel.modelspec import ModelSpec, build_model
from flywheel.registry import Registry
from flywheel.service import ServiceConfig, create_app
from flywheel.settings import Settings
from tests.deadlines import deadline
from tests.serving import uvicorn_serving

pytestmark = pytest.mark.integration
TOKEN = "ui-test-token-0123456789abcdef0123"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SPEC = ModelSpec(input_dim=8, hidden=[8], labels=["class_0", "class_1", "class_2"])
PASSED = (
    "passed: better on recent data, trusted holdout within tolerance; recent 0.900 vs "
    "0.800 (n=40); trusted 0.950 vs 0.960 (n=200, tol 0.02)"
)


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI must run the browser test: `make test` installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _missing(
            f"playwright is not installed ({exc}): pip install -c constraints.txt -e '.[test]'"
        )
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def _publish(registry: Registry, parent: str, source: str, gate: str, **extra: str) -> str:
    metrics = (
        {"holdout_accuracy": 0.96}
        if parent == ""
        else {
            "gate_passed": float(gate.startswith("passed")),
            "gate_trusted_candidate": 0.95,
            "gate_recent_candidate": 0.9 if gate.startswith("passed") else 0.7,
        }
    )
    return registry.publish(
        SPEC,
        build_model(SPEC),
        tags={
            "parent_version": parent,
            "source": source,
            "examples": extra.pop("examples", "[0,100)"),
            "epsilon": extra.pop("epsilon", "none"),
            "delta": extra.pop("delta", "none"),
            "gate": gate,
        },
        metrics=metrics,
    )


def _seed(settings: Settings) -> Registry:
    """v1 seed → v2 champion → v3 rejected; v4 pending review (ε 0.9)."""
    registry = Registry.of(settings)
    v1 = _publish(registry, "", "manual", "initial: no champion to compare", examples="seed[0,800)")
    registry.set_champion(v1)
    v2 = _publish(registry, v1, "online", PASSED, examples="ids 1..100 (100 new, update 1)")
    registry.promote(v2, reason="gate passed", actor="flywheel-learner")
    _publish(
        registry,
        v2,
        "online",
        "rejected: not better on recent data; recent 0.700 vs 0.900 (n=40)",
        examples="ids 101..200 (100 new, update 2)",
    )
    v4 = _publish(
        registry,
        v2,
        "online",
        PASSED,
        examples="ids 201..300 (100 new, update 3)",
        epsilon="0.9",
        delta="1e-05",
    )
    registry.set_tags(v4, {"review": "pending"})
    assert registry.champion_version() == "2" and v4 == "4"
    return registry


def wait_for(cond: Callable[[], bool], timeout_s: float) -> bool:
    until = time.monotonic() + deadline(timeout_s)
    while not cond():
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[str]:
    with uvicorn_serving(create_app(ServiceConfig.of(settings)), "test-review-ui", 60) as url:
        yield url


def _read_only_page_hides_admin_controls(chromium, url: str) -> None:
    """As a service without FLYWHEEL_ADMIN_TOKEN answers `/config` (the API side of that
    is tests/unit/test_review_api.py): no token form, disabled buttons, a clear note."""
    page = chromium.new_page()

    def read_only(route) -> None:
        response = route.fetch()
        route.fulfill(response=response, json=response.json() | {"admin_enabled": False})

    page.route("**/v1/review/config", read_only)
    page.goto(f"{url}/ui/", wait_until="domcontentloaded")
    page.wait_for_selector("body[data-loaded=true]", timeout=deadline(30_000))
    assert page.locator("#mode").inner_text() == "read-only"
    assert page.locator("#admin-off").is_visible()
    assert not page.locator("#admin-form").is_visible()
    assert page.locator("#pending button.approve").first.is_disabled()
    assert page.locator("#rollback").is_disabled()
    page.close()


def served(url: str) -> str:
    return httpx.get(f"{url}/v1/model", timeout=5).json()["version"]


def test_review_page_shows_versions_and_an_approve_click_moves_the_champion(
    settings: Settings, chromium, tmp_path: Path
):
    from playwright.sync_api import expect

    # the admin token's own rules, as with FLYWHEEL_AUTH=off (as tests/unit/test_review_api.py;
    # app keys on the page's actions: tests/unit/test_auth.py)
    settings = settings.model_copy(
        update={"admin_token": SecretStr(TOKEN), "auto_promote": False, "auth": "off"}
    )
    registry = _seed(settings)
    with serving(settings) as url:
        assert served(url) == "2"
        _read_only_page_hides_admin_controls(chromium, url)
        page = chromium.new_page(viewport={"width": 1400, "height": 1800})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        expected = "status of 401"  # the wrong-token attempt below
        page.goto(f"{url}/ui", wait_until="domcontentloaded")
        page.wait_for_selector("body[data-loaded=true]", timeout=deadline(30_000))

        rows = page.locator("#versions tbody tr")
        assert rows.count() == 4
        assert page.locator("#versions tbody tr").first.get_attribute("data-version") == "4"
        assert "★ champion" in page.locator("#versions tr[data-version='2']").inner_text()
        assert "rejected" in page.locator("#versions tr[data-version='3']").inner_text()
        assert "pending review" in page.locator("#versions tr[data-version='4']").inner_text()
        assert page.locator("#mode").inner_text().startswith("admin actions on")
        assert "0.9" in page.locator("#privacy-chart").inner_html()  # ε bar of v4
        assert page.locator("#timeline-chart circle").count() == 4
        pending = page.locator("#pending tbody tr[data-version='4']")
        assert pending.count() == 1

        # a wrong token is refused, and nothing moves
        page.fill("#token", "not-the-token")
        page.fill("#actor", "playwright")
        pending.locator("input.reason").fill("looks good in the browser")
        pending.locator("button.approve").click()
        expect(page.locator("#message")).to_contain_text(
            "wrong admin token", timeout=deadline(30_000)
        )
        assert registry.champion_version() == "2"

        page.fill("#token", TOKEN)
        page.locator("#pending tbody tr[data-version='4'] button.approve").click()
        expect(page.locator("#message")).to_have_text(
            re.compile(r"^approved v4: now champion"), timeout=deadline(60_000)
        )
        assert registry.champion_version() == "4"
        tags = registry.info("4", with_run=False).tags
        assert (tags["review"], tags["review_by"], tags["review_reason"]) == (
            "approved",
            "playwright",
            "looks good in the browser",
        )
        page.wait_for_selector("#versions tr.champion[data-version='4']", timeout=deadline(30_000))
        assert page.locator("#pending-empty").is_visible()
        page.screenshot(path=str(tmp_path / "review-ui.png"), full_page=True)
        if os.environ.get("REVIEW_UI_SCREENSHOT_DIR"):  # for a person to look at
            shutil.copy(
                tmp_path / "review-ui.png",
                Path(os.environ["REVIEW_UI_SCREENSHOT_DIR"]) / "review-ui.png",
            )
        # the model event reaches the service's follower: it swaps to the approved version
        assert wait_for(lambda: served(url) == "4", 40), "the service did not swap to v4"
        assert [e for e in errors if expected not in e] == [], errors
