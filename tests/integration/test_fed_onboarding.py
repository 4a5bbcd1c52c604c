"""docs/federated.md's onboarding, run: its `fed:NAME` blocks on fresh homes, on loopback.

`fed:platform` (settings, `flywheel init`) runs first; `fed:superlink` (with the
platform block's `export` lines) and `fed:site` run in the background, each in its own
process group, stopped (SIGINT, then SIGKILL after 30 s) when the test ends, however it
ends; `fed:server` runs in the platform's settings. Substituted, because a test must not
take fixed ports: the SuperLink's address (a free port) and the site's Runtime API port
(`FLYWHEEL_FED_RUNTIME_PORT`, a free port). The folder is a temporary one with `docs/`
linked to the clone's; outer `FLYWHEEL_*` variables are dropped.

Before issue 31 the page stopped at `fed client` on its fresh home ("run `flywheel db
upgrade`"). The run must complete; the new site, whose store is empty, is refused cleanly
and the round is dropped with the reason in the summary.
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

import pytest

from flywheel.broker import free_port
from flywheel.learner.federated.processes import wait_for_port
from tests.deadlines import deadline

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "federated.md"
BLOCK = re.compile(r"^```(\w+) fed:(\w+)\n(.*?)^```$", re.S | re.M)
WAIT_S = 180.0  # upper bound: every wait ends as soon as its condition holds
LINK = "127.0.0.1:9093"


def blocks() -> dict[str, str]:
    found: dict[str, str] = {}
    for _lang, name, body in BLOCK.findall(PAGE.read_text()):
        assert name not in found, f"docs/federated.md: two blocks named fed:{name}"
        found[name] = body
    return found


def test_the_page_marks_every_onboarding_step():
    assert list(blocks()) == ["platform", "superlink", "site", "server"]
    assert LINK in blocks()["platform"] and LINK in blocks()["site"]


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


def test_onboarding_as_written_runs_on_fresh_homes(tmp_path, background):
    found = blocks()
    link = f"127.0.0.1:{free_port()}"
    page = {name: body.replace(LINK, link) for name, body in found.items()}
    platform_env = "\n".join(
        line for line in page["platform"].splitlines() if line.startswith("export ")
    )
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])

    def shell(script: str) -> list[str]:
        return ["bash", "-euo", "pipefail", "-c", script]

    def start(name: str, script: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                shell(script),
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        background.append(proc)
        return proc, log

    init = subprocess.run(
        shell(page["platform"]),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert init.returncode == 0, init.stderr[-3000:]
    link_proc, link_log = start("superlink", f"{platform_env}\n{page['superlink']}")
    wait_for_port(link, WAIT_S, link_proc)
    site_proc, site_log = start(
        "site", f"export FLYWHEEL_FED_RUNTIME_PORT={free_port()}\n{page['site']}"
    )
    until = time.monotonic() + deadline(WAIT_S)
    while "SuperNode ID:" not in site_log.read_text(errors="replace"):
        assert site_proc.poll() is None, site_log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < until, site_log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    site_text = site_log.read_text(errors="replace")
    assert "had no Flywheel schema: created" in site_text  # the fresh site home
    run = subprocess.run(
        shell(f"{platform_env}\n{page['server']}"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
    )
    assert run.returncode == 0, run.stderr[-3000:] + link_log.read_text(errors="replace")[-3000:]
    summary = json.loads(run.stdout)
    assert summary["rounds"] == [] and summary["version"] is None
    assert [d["round"] for d in summary["dropped"]] == [1], summary["dropped"]
    (refusal,) = summary["refused"]
    assert "no trainable examples" in refusal["why"], refusal
    assert site_proc.poll() is None and link_proc.poll() is None  # both still serve
