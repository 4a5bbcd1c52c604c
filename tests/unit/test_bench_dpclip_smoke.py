"""`python -m bench dpclip` keeps working: one step per method on the demo model.

Figures are not asserted (they belong to docs/benchmarks.md); the JSON structure is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_dpclip_json_has_every_method_and_target(monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is a plain folder, not installed
    from bench.__main__ import app

    result = CliRunner().invoke(
        app,
        [
            "dpclip",
            "--models",
            "demo",
            "--batch",
            "16",
            "--seconds",
            "0",
            "--rounds",
            "1",
            "--warmup",
            "1",
            "--min-steps",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, (result.stderr or "")[-3000:] + repr(result.exception)
    doc = json.loads(result.stdout)
    assert doc["benchmark"] == "dpclip"
    assert {"machine", "config", "models", "summary", "date", "command"} <= doc.keys()
    (model,) = doc["models"]
    assert model["name"] == "demo" and model["architecture"] == "8-64-64-3"
    methods = {"ours", "ghost", "hooks", "nonprivate", "ours_nonoise", "ours_autograd"}
    assert set(model["samples_per_s"]) == methods == set(model["samples_per_cpu_s"])
    assert all(v > 0 for v in model["samples_per_s"].values())
    assert all(len(model["runs"][m]) == 1 and model["runs"][m][0]["steps"] >= 1 for m in methods)
    assert {"vs_nonprivate", "vs_ghost", "vs_hooks", "vs_ours_autograd"} <= set(model["targets"])
    assert model["pass"] == (
        model["targets"]["vs_nonprivate"]["pass"] and model["targets"]["vs_ghost"]["pass"]
    )
    assert doc["summary"]["all_pass"] == model["pass"]
