"""The service's live-monitoring gauges on `/metrics` and `/v1/review/monitor`, on a real
SQLite store holding hand-made traffic (tests/monitoring_rows.py, moved to the present):
the background refresh fills the gauges, a scrape only reads them, and monitoring off
leaves them out."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from flywheel.modelspec import ModelSpec, build_model
from flywheel.review import wilson
from flywheel.service import ModelHolder, ServedModel, ServiceConfig, create_app
from flywheel.settings import Settings, prepare_home
from flywheel.store import upgrade
from tests.monitoring_rows import MODEL, fill

SPEC = ModelSpec(input_dim=2, hidden=[4], labels=["a", "b"])


def _client(tmp_path, list_event_log, **overrides) -> TestClient:
    settings = Settings(home=tmp_path / "home", model_name=MODEL, auth="off", **overrides)
    prepare_home(settings)
    upgrade(settings.resolved_database_url)
    fill(settings.resolved_database_url, now=datetime.now(UTC))
    torch.manual_seed(0)
    holder = ModelHolder()
    holder.swap(ServedModel.prepare(MODEL, "1", SPEC, build_model(SPEC)))
    app = create_app(ServiceConfig.of(settings), holder=holder, event_log=list_event_log())
    return TestClient(app)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_gauges_come_from_the_background_refresh(tmp_path, list_event_log, deadline):
    with _client(tmp_path, list_event_log, live_monitor_interval_s=0.2) as client:
        end = time.monotonic() + deadline(20)
        while "flywheel_live_accuracy{" not in (text := client.get("/metrics").text):
            assert time.monotonic() < end, "the live gauges never appeared"
            time.sleep(0.1)
        samples = _samples(text)
    v1 = (("version", "1"),)
    assert samples[("flywheel_live_accuracy", v1)] == pytest.approx(0.8)
    low, high = wilson(24, 30)
    assert samples[("flywheel_live_accuracy_low", v1)] == pytest.approx(low)
    assert samples[("flywheel_live_accuracy_high", v1)] == pytest.approx(high)
    assert samples[("flywheel_live_labels", v1)] == 30
    assert samples[("flywheel_live_unlabelled_share", v1)] == pytest.approx(0.25)
    assert samples[("flywheel_live_cbpe_accuracy", (("version", "3"),))] == pytest.approx(0.7)
    assert samples[("flywheel_live_cbpe_labelled", (("version", "2"),))] == pytest.approx(0.9)
    delay = samples[("flywheel_live_label_delay_seconds", (("quantile", "0.9"), ("version", "1")))]
    assert delay == pytest.approx(2700.0)
    # v3's 300 shifted inputs are read; v1's 40 are too few for a PSI reading
    assert samples[("flywheel_live_max_psi", (("version", "3"),))] > 0.25
    assert ("flywheel_live_max_psi", v1) not in samples
    assert ("flywheel_live_accuracy", (("version", "3"),)) not in samples  # no label yet
    assert samples[("flywheel_live_monitor_failures_total", ())] == 0
    assert samples[("flywheel_live_monitor_refreshed_timestamp_seconds", ())] > 0


def test_monitoring_off_leaves_the_gauges_out_and_the_page_still_reads(tmp_path, list_event_log):
    with _client(tmp_path, list_event_log, live_monitor_interval_s=0) as client:
        assert "flywheel_live_" not in client.get("/metrics").text
        doc = client.get("/v1/review/monitor", params={"hours": 24, "buckets": 12}).json()
        assert doc["available"] is True
        versions = {v["version"]: v for v in doc["report"]["versions"]}
        assert versions["1"]["labelled"] == 30
        assert sum(p["labelled"] for p in doc["timeline"]["points"]) == 50
        seg = client.get("/v1/review/monitor", params={"segment": "country"}).json()
        assert {s["segment"] for s in seg["report"]["versions"][0]["segments"]} == {"DE", "FR"}
        bad = client.get("/v1/review/monitor", params={"segment": "colour"})
        assert bad.status_code == 422 and "no such feature" in bad.json()["detail"]
        assert client.get("/v1/review/monitor", params={"hours": 0}).status_code == 422


def test_a_failed_refresh_is_counted_and_keeps_the_scrape_working(tmp_path):
    from sqlalchemy import create_engine

    from flywheel.service.monitor_metrics import LiveMonitor, MonitorCollector
    from flywheel.settings import GateSettings

    # a database without the store's tables: every query fails
    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    monitor = LiveMonitor(lambda: (engine, None), MODEL, GateSettings())
    assert monitor.refresh() is False
    assert monitor.failures == 1 and monitor.report is None
    assert monitor.note.startswith("live monitoring failed: ")
    families = {f.name: f for f in MonitorCollector(monitor).collect()}
    assert list(families) == ["flywheel_live_monitor_failures"]
    assert families["flywheel_live_monitor_failures"].samples[0].value == 1
    engine.dispose()
