"""`flywheel demo`, the README's first command, on embedded defaults in a fresh home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
FLYWHEEL = str(Path(sys.executable).parent / "flywheel")


def test_demo_runs_the_stack_and_every_record_reaches_kafka(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_SEED_EXAMPLES": "1000"}
    r = subprocess.run([FLYWHEEL, "demo", "--requests", "400", "--json"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["predictions"] == summary["prediction_events"] == 400
    assert summary["corrections"] == summary["correction_events"] > 0
    assert summary["versions_served"] == ["1"]
    # the feedback worker joined every correction and analyzed the errors
    assert summary["corrections_joined"] == summary["corrections"]
    [report] = summary["error_report"]
    assert report["corrections"] == summary["corrections"] and report["errors"] > 0
    assert sum(report["error_types"].values()) == report["errors"]
    # the simulated app crosses an abrupt concept change the seed model has not seen
    assert summary["accuracy_before_drift"] > 0.8
    assert summary["accuracy_after_drift"] < summary["accuracy_before_drift"] - 0.2
    # all state stays under FLYWHEEL_HOME: the store was migrated there, nothing in the cwd
    assert (tmp_path / "home" / "flywheel.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
