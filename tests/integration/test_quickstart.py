"""docs/quickstart.md, run: its blocks marked `qs:NAME` in a fresh folder, in page order.

Run verbatim, each in `bash -euo pipefail` after the `qs:env` block: `qs:schema`,
`qs:edit`, `qs:init`, `qs:list`, `qs:feedback`, `qs:learn`, and the `qs:app` Python file.
Substituted, because a test must not take fixed ports or install anything:

- `qs:install` is not run: the test's own environment has flywheel installed; its
  interpreter's folder is first on PATH, so `flywheel` and `python` are that install.
- the broker's port: `127.0.0.1:9092` in `qs:env` and `flywheel broker` (`--port`) become a
  free port; `flywheel serve` is given a free `FLYWHEEL_PORT`, which the page names as the
  way to move it, and the app reads `SERVICE_URL`, which the page's app reads too.
- the folder: a temporary one with `docs/` linked to the clone's, so `$PWD/.flywheel`
  (the home), `schema.json` and `app.py` are written there. Outer `FLYWHEEL_*` variables
  are dropped so the page's settings are the only ones.

The long-running blocks (`qs:broker`, `qs:serve`, `qs:feedback`, `qs:learn`) run in the
background, each in its own process group, and are stopped (SIGINT, then SIGKILL after
30 s) when the test ends, however it ends. The app must get a prediction for every row
and every correction must be accepted; then the feedback worker must have joined them
(`flywheel feedback report --json` counts 600 corrections).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flywheel.broker import free_port
from tests.deadlines import deadline

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "quickstart.md"
BLOCK = re.compile(r"^```(\w+) qs:(\w+)\n(.*?)^```$", re.S | re.M)
RUN_ORDER = [
    "env",
    "schema",
    "edit",
    "init",
    "list",
    "key",
    "broker",
    "serve",
    "feedback",
    "learn",
]
WAIT_S = 180.0  # upper bound: every wait ends as soon as its condition holds


def blocks() -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for lang, name, body in BLOCK.findall(PAGE.read_text()):
        assert name not in found, f"docs/quickstart.md: two blocks named qs:{name}"
        found[name] = (lang, body)
    return found


def test_the_page_marks_every_step_the_test_runs():
    names = list(blocks())
    assert names == ["install", *RUN_ORDER, "app"], names


def shell(env_block: str, body: str) -> list[str]:
    return ["bash", "-euo", "pipefail", "-c", f"{env_block}\n{body}"]


@pytest.fixture()
def background() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for p in procs:
            try:
                p.wait(deadline(30))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(deadline(10))


def wait_for(what: str, check, procs: list[subprocess.Popen], logs: Path) -> None:
    until = time.monotonic() + deadline(WAIT_S)
    while not check():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > until:
            tails = {f.name: f.read_text()[-2000:] for f in sorted(logs.glob("*.log"))}
            raise AssertionError(f"waiting for {what}: exited {dead}; logs {tails}")
        time.sleep(0.25)


def test_the_quickstart_runs(tmp_path, background):
    page = blocks()
    work = tmp_path / "clone"
    work.mkdir()
    (work / "docs").symlink_to(ROOT / "docs")
    logs = tmp_path / "logs"
    logs.mkdir()
    kafka, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLYWHEEL_PORT"] = str(http)
    env["SERVICE_URL"] = f"http://127.0.0.1:{http}"
    exports = page["env"][1]
    assert "127.0.0.1:9092" in exports
    exports = exports.replace("127.0.0.1:9092", f"127.0.0.1:{kafka}")

    def run(name: str) -> str:
        out = subprocess.run(
            shell(exports, page[name][1]), cwd=work, env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, f"qs:{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    def start(name: str, body: str | None = None) -> None:
        log = open(logs / f"{name}.log", "w")  # noqa: SIM115 -- the child holds it
        background.append(
            subprocess.Popen(
                shell(exports, f"exec {(body or page[name][1]).strip()}"),
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        log.close()

    run("schema")
    assert json.loads((work / "schema.json").read_text())["label"] == "fraud"
    run("edit")
    edited = json.loads((work / "schema.json").read_text())["features"]
    assert [f["missing"] for f in edited if f["name"] == "amount"] == ["error"]
    kinds = {
        f["name"]: f["kind"] for f in json.loads((work / "schema.json").read_text())["features"]
    }
    assert kinds == {
        "order_id": "ignore",
        "amount": "numeric",
        "country": "categorical",
        "device": "categorical",
        "mobile": "boolean",
    }
    run("init")
    assert "1" in run("list")
    run("key")  # app `shop`: its key in app-key.json, read by app.py
    assert json.loads((work / "app-key.json").read_text())["key"].startswith("fw_")

    broker = page["broker"][1].strip()
    assert broker == "flywheel broker"
    start("broker", f"{broker} --port {kafka}")
    wait_for(
        "the broker's address",
        lambda: f"127.0.0.1:{kafka}" in (logs / "broker.log").read_text(),
        background,
        logs,
    )
    for name in ("serve", "feedback", "learn"):
        start(name)

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{http}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for("the service", ready, background, logs)
    (work / "app.py").write_text(page["app"][1])
    out = subprocess.run(
        [sys.executable, "app.py"], cwd=work, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ModelRef(name='flywheel', version='1')" in out.stdout, out.stdout
    assert "corrections accepted: 600" in out.stdout, out.stdout

    # the worker joins them: the report counts the corrected predictions of version 1
    def joined() -> bool:
        report = subprocess.run(
            shell(exports, "flywheel feedback report --json"),
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if report.returncode != 0:
            return False
        versions = json.loads(report.stdout)["versions"]
        return sum(v["corrections"] for v in versions) == 600

    wait_for("600 joined corrections", joined, background, logs)
