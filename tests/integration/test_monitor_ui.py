"""The review page's live-accuracy section in a real browser (Debian's headless Chromium
driven by Playwright, as tests/integration/test_review_ui.py): the service, over a SQLite
store holding hand-made live traffic (tests/monitoring_rows.py), draws each version's
accuracy with its interval band and CBPE line, and the table of live numbers.

Without Chromium or Playwright the test skips locally and fails under CI=true.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime

import pytest

from flywheel.modelspec import ModelSpec, build_model
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings, prepare_home
from flywheel.store import upgrade
from tests.deadlines import deadline
from tests.monitoring_rows import MODEL, fill
from tests.serving import uvicorn_serving

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SPEC = ModelSpec(input_dim=2, hidden=[4], labels=["a", "b"])


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI must run the browser test: `make test` installs chromium)")
    pytest.skip(reason)


def test_the_page_draws_live_accuracy_with_its_interval_and_cbpe(tmp_path, list_event_log):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _missing(f"playwright is not installed ({exc})")
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    settings = Settings(
        home=tmp_path / "home", model_name=MODEL, auth="off", live_monitor_interval_s=0
    )
    prepare_home(settings)
    upgrade(settings.resolved_database_url)
    fill(settings.resolved_database_url, now=datetime.now(UTC))
    holder = ModelHolder()
    holder.swap(ServedModel.prepare(MODEL, "1", SPEC, build_model(SPEC)))
    app = create_app(ServiceConfig.of(settings), holder=holder, event_log=list_event_log())
    with uvicorn_serving(app, "test-monitor-ui", 60) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{url}/ui/", wait_until="domcontentloaded")
            page.wait_for_selector("body[data-loaded=true]", timeout=deadline(30_000))
            rows = page.locator("#live tbody tr")
            assert rows.count() == 3
            v1 = page.locator("#live tbody tr[data-version='1']").inner_text()
            assert "80.0 % [62.7 %, 90.5 %]" in v1
            v3 = page.locator("#live tbody tr[data-version='3']").inner_text()
            assert "0.700" in v3 and "(major)" in v3  # CBPE, and its shifted inputs
            chart = page.locator("#live-chart")
            assert chart.locator("polygon").count() == 2  # v1 and v2 have labels
            assert chart.locator("polyline").count() == 4  # accuracy and CBPE each
            assert chart.locator("circle").count() >= 2
            assert "NaN" not in chart.inner_html()
            assert page.locator("#live-note").is_hidden()
            assert errors == [], errors  # no script error on the page
        finally:
            browser.close()
