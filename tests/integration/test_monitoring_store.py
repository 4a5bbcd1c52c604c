"""Live monitoring read from a real store, on SQLite and PostgreSQL: the same hand-made
traffic (tests/monitoring_rows.py) gives the same numbers on both databases."""

from __future__ import annotations

import math

import pytest

from flywheel.review import live_report, live_timeline, wilson
from flywheel.store import make_engine, upgrade
from tests.monitoring_rows import MODEL, NOW, fill


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = (
        f"sqlite:///{tmp_path / 'flywheel.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    upgrade(url)
    fill(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def test_the_report_counts_labels_delays_unlabelled_cbpe_and_drift_per_version(store):
    doc = live_report(store, MODEL, window_s=86400, now=NOW, sample=1000)
    v = {d["version"]: d for d in doc["versions"]}
    assert list(v) == ["1", "2", "3"]
    assert [v[k]["served_as"] for k in v] == [["answered"], ["shadow"], ["answered"]]
    # answered predictions labelled in the window: v1's 30 (the one labelled 30 h ago is out)
    assert doc["label_delay"] == {
        "n": 30,
        "p50_s": 1500.0,
        "p90_s": 2700.0,
        "p99_s": 3000.0,
        "max_s": 3000.0,
    }
    one = v["1"]
    assert (one["labelled"], one["answered_labelled"], one["correct"]) == (30, 30, 24)
    assert one["accuracy"] == pytest.approx(0.8)
    assert (one["accuracy_low"], one["accuracy_high"]) == pytest.approx(wilson(24, 30))
    expected_loss = (24 * -math.log(0.8) + 6 * -math.log(0.2)) / 30
    assert one["log_loss"] == pytest.approx(expected_loss)
    assert one["cbpe_labelled"] == pytest.approx(0.8)
    assert one["calibration_gap"] == pytest.approx(0.0, abs=1e-9)
    assert one["label_delay"]["p90_s"] == 2700.0
    assert one["label_delay"]["max_s"] == pytest.approx(3000.0, abs=0.01)
    # 40 served, 30 labelled; 5 predicted 60 s ago are pending (younger than the p90
    # delay), so 35 were due a label and 5 of those are missing
    assert (one["served"], one["served_labelled"]) == (40, 30)
    assert one["unlabelled_share"] == pytest.approx(0.25)
    assert (one["due"], one["due_labelled"], one["pending"]) == (35, 30, 5)
    assert one["missing_share"] == pytest.approx(5 / 35)
    assert one["cbpe_unlabelled"] == pytest.approx(0.8)
    # the shadow: scored 20 (its scores, not predictions), right on half, 0.9 confident
    two = v["2"]
    assert (two["labelled"], two["answered_labelled"], two["served"]) == (20, 0, 20)
    assert two["accuracy"] == pytest.approx(0.5)
    assert two["calibration_gap"] == pytest.approx(0.4)
    assert two["label_delay"]["p50_s"] == 1000.0 and two["label_delay"]["max_s"] == 2000.0
    assert two["cbpe_unlabelled"] is None and two["unlabelled_share"] == 0.0
    assert two["drift"]["rows"] == 20  # its inputs are the predictions' it scored
    # no label yet: no accuracy, but CBPE estimates 0.7; all 300 were due
    three = v["3"]
    assert three["labelled"] == 0 and three["accuracy"] is None
    assert three["accuracy_low"] is None
    assert three["cbpe_unlabelled"] == pytest.approx(0.7)
    assert three["missing_share"] == 1.0
    # drift: v3's inputs moved (amount + 3, country all DE), v1's did not
    d1 = {f["name"]: f for f in one["drift"]["features"]}
    d3 = {f["name"]: f for f in three["drift"]["features"]}
    assert set(d3) == {"amount", "country"}
    assert d3["amount"]["psi"] >= 0.25 and d3["amount"]["level"] == "major"
    assert d3["country"]["psi"] >= 0.25
    assert d1["amount"]["psi"] < d3["amount"]["psi"] / 5
    assert d1["country"]["psi"] < 0.1
    # 40 rows: too few for a reading (noise alone is ~0.2 over ten deciles)
    assert d1["amount"]["level"] == one["drift"]["level"] == "few rows"
    assert three["drift"]["max_feature"] == "amount"


def test_segments_split_the_sampled_rows_by_category_and_by_quartile(store):
    doc = live_report(store, MODEL, window_s=86400, now=NOW, segment="country")
    one = next(d for d in doc["versions"] if d["version"] == "1")
    segs = {s["segment"]: s for s in one["segments"]}
    assert set(segs) == {"DE", "FR"}
    assert segs["DE"]["rows"] == segs["FR"]["rows"] == 20
    assert segs["DE"]["labelled"] == segs["FR"]["labelled"] == 15
    assert segs["DE"]["accuracy"] == pytest.approx(12 / 15)
    three = next(d for d in doc["versions"] if d["version"] == "3")
    assert [s["segment"] for s in three["segments"]] == ["DE"]
    doc = live_report(store, MODEL, window_s=86400, now=NOW, segment="amount")
    one = next(d for d in doc["versions"] if d["version"] == "1")
    assert sum(s["rows"] for s in one["segments"]) == 40
    assert all(s["segment"].startswith("Q") for s in one["segments"])
    three = next(d for d in doc["versions"] if d["version"] == "3")
    # amount + 3: nearly every input is above the trusted data's third quartile (~0.67)
    q4 = [s for s in three["segments"] if s["segment"].startswith("Q4")]
    assert q4 and q4[0]["rows"] >= 280 and q4[0]["segment"].endswith(", inf]")
    with pytest.raises(ValueError, match="no such feature; the features: amount, country"):
        live_report(store, MODEL, now=NOW, segment="colour")


def test_a_short_window_sees_only_its_labels(store):
    # the last 3 h: no v1 label (they came 10 h ago), v3's predictions still in
    doc = live_report(store, MODEL, window_s=3 * 3600, now=NOW)
    v = {d["version"]: d for d in doc["versions"]}
    assert v["1"]["labelled"] == 0 and v["1"]["served"] == 5
    assert doc["label_delay"]["n"] == 0 and v["1"]["missing_share"] is None
    assert v["3"]["served"] == 300


def test_the_timeline_buckets_labels_by_time_with_intervals(store):
    doc = live_timeline(store, MODEL, window_s=86400, buckets=24, now=NOW)
    by_version: dict[str, list] = {}
    for p in doc["points"]:
        by_version.setdefault(p["version"], []).append(p)
    assert sum(p["labelled"] for p in by_version["1"]) == 30
    assert sum(p["labelled"] for p in by_version["2"]) == 20
    assert "3" not in by_version
    for p in doc["points"]:
        assert p["accuracy_low"] <= p["accuracy"] <= p["accuracy_high"]
        assert p["start"] < p["end"]
    # v1's labels came between 10 h ago (+100 s) and 9 h 31 min ago (+3000 s): hours 14, 15
    starts = {p["start"][11:16] for p in by_version["1"]}
    assert starts <= {"01:59", "02:00", "02:01", "02:59", "03:00"}  # noqa: SIM300
    assert by_version["1"][0]["cbpe"] == pytest.approx(0.8)
