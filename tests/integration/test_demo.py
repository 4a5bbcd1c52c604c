"""`flywheel demo`, the README's first command, on embedded defaults in a fresh home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.demo.report import RECOVERY_MARGIN

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


@pytest.mark.timeout(600)  # the demo's own bound (500 s) and the report check
def test_demo_closes_the_loop_and_writes_its_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_SEED_EXAMPLES": "1000"}
    report = tmp_path / "home" / "report"
    # 100 rows/s: 20 s after the concept change, for the loop to turn a few times even on
    # a machine that runs slow (at 150 rows/s a CPU-starved run recovered too late)
    r = subprocess.run(
        [
            FLYWHEEL,
            "demo",
            "--requests",
            "3000",
            "--rate",
            "100",
            "--json",
            "--report",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["predictions"] == summary["prediction_events"] == 3000
    assert summary["corrections"] == summary["correction_events"] > 0
    # the feedback worker joined every correction
    assert summary["corrections_joined"] == summary["corrections"]
    # the initial model is good before the concept change and poor after it; the loop
    # promoted new versions that the app was served, and they recovered
    assert summary["accuracy_frozen_before_drift"] > 0.9
    assert summary["accuracy_frozen_after_drift"] < 0.6
    assert summary["promoted_versions"]
    assert set(summary["promoted_versions"]) & set(summary["versions_served"])
    # by the product's own margin, over the settled end of the run (a stricter 0.25 failed
    # once in CI at 0.24 while 25 runs here gave 0.32-0.54: how soon the loop catches up
    # depends on how the shared machine runs), and over all of the drift, ramp included
    assert summary["accuracy_flywheel_after_drift"] >= (
        summary["accuracy_frozen_after_drift"] + RECOVERY_MARGIN
    )
    assert summary["accuracy_flywheel_after_drift_all"] > summary["accuracy_frozen_after_drift_all"]
    assert summary["freshness_median_s"] is not None and summary["freshness_median_s"] > 0
    assert summary["recovered"] is True
    # the report: the same summary, a markdown page and the plot
    assert json.loads((report / "summary.json").read_text()) == summary
    md = (report / "summary.md").read_text()
    assert f"v{summary['promoted_versions'][0]}" in md and "accuracy.png" in md
    assert (report / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # all state stays under FLYWHEEL_HOME: the store was migrated there, nothing in the cwd
    assert (tmp_path / "home" / "flywheel.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
