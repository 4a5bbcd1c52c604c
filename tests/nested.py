"""Running a small pytest session in a subprocess with this suite's plugins (tests/conftest.py,
optionally more), to test the harness itself: deadlines, process clean-up, parallel runs."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

from tests.benchrun import ROOT
from tests.deadlines import deadline

__all__ = ["NestedRun", "run_nested"]

INI = "[pytest]\ntimeout = 300\naddopts = -p no:cacheprovider\n"


class NestedRun(NamedTuple):
    returncode: int
    output: str
    outcomes: dict[str, str]  # test name -> passed / failed / error / skipped


def run_nested(
    folder: Path,
    files: dict[str, str],
    *args: str,
    plugins: tuple[str, ...] = ("tests.conftest",),
    env: dict[str, str] | None = None,
    timeout_s: float = 180,
) -> NestedRun:
    """Write `files` into `folder` and run pytest on it (cwd: the repository, so `tests` is
    importable) with `plugins`; its exit code, output and each test's outcome (a test with a
    teardown error counts as "error")."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pytest.ini").write_text(INI)
    for name, text in files.items():
        (folder / name).write_text(text)
    report = folder / "report.xml"
    child_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_XDIST", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST"))
    }
    child_env.update(env or {})
    plugin_args = [a for p in plugins for a in ("-p", p)]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", *plugin_args, "--rootdir", str(folder)]
        + ["-c", str(folder / "pytest.ini"), f"--junitxml={report}", "-q", str(folder), *args],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=deadline(timeout_s),
    )
    outcomes: dict[str, str] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "")
            kinds = {child.tag for child in case}
            outcome = next(
                (k for k in ("error", "failure", "skipped") if k in kinds), "passed"
            ).replace("failure", "failed")
            if outcomes.get(name) != "error":  # a teardown error is reported as a 2nd case
                outcomes[name] = outcome
    return NestedRun(r.returncode, r.stdout + r.stderr, outcomes)
