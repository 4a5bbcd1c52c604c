"""`flywheel up` as an operator runs it: the loop comes up, serves and learns, a killed
child comes back, SIGTERM leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.client import Client

pytestmark = pytest.mark.integration
START_S = 600.0  # a new home trains its first model; this machine is shared and busy


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (from /proc: no psutil here), pid -> command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents[int(entry.name)] = ppid
        commands[int(entry.name)] = cmd
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(what: str, condition, timeout_s: float, proc: subprocess.Popen, out: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"flywheel up exited ({proc.returncode}):\n{out.read_text()}")
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{out.read_text()[-4000:]}")


def test_up_runs_the_loop_restarts_a_child_and_stops_everything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(tmp_path / "home")}
    out = tmp_path / "up.out"
    flywheel = [sys.executable, "-m", "flywheel"]
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [*flywheel, "up", "--port", "0", "--no-panel"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    seen: dict[int, str] = {}
    try:
        wait_for("ready", lambda: "up: ready:" in out.read_text(), START_S, proc, out)
        joined = subprocess.run(
            [*flywheel, "up", "--print-env"], env=env, capture_output=True, text=True, timeout=60
        )
        assert joined.returncode == 0, joined.stderr
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", joined.stdout, re.M))
        assert exports["FLYWHEEL_HOME"] == str(tmp_path / "home")
        url = f"http://127.0.0.1:{exports['FLYWHEEL_PORT']}"
        seen = descendants(proc.pid)
        names = " | ".join(seen.values())
        for part in ("flywheel broker", "flywheel serve", "flywheel feedback", "flywheel learn"):
            assert part in names, names
        assert "tansu" in names

        # the loop: predictions and their corrections reach the training store
        rows = [{f"x{i}": (n * 7 + i) % 10 / 10 for i in range(8)} for n in range(40)]
        with Client(url, api_key=exports["FW_APP_KEY"]) as fw:
            result = fw.predict(rows)
            assert len(result) == 40
            assert fw.correct([(p.id, p.label) for p in result.predictions]) == 40
        report_env = env | {k: v for k, v in exports.items() if k.startswith("FLYWHEEL_")}

        def corrections_joined() -> int:
            done = subprocess.run(
                [*flywheel, "feedback", "report", "--json"],
                env=report_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            return sum(v["corrections"] for v in json.loads(done.stdout)["versions"]) >= 40

        wait_for("corrections joined", corrections_joined, START_S, proc, out)

        # a crashed child is started again
        worker = next(p for p, c in descendants(proc.pid).items() if "flywheel feedback" in c)
        os.kill(worker, signal.SIGKILL)
        wait_for("restart noticed", lambda: "feedback-0 exited" in out.read_text(), 60, proc, out)

        def restarted() -> bool:
            return any(
                "flywheel feedback" in c and p != worker for p, c in descendants(proc.pid).items()
            )

        wait_for("worker restarted", restarted, 120, proc, out)
        seen |= descendants(proc.pid)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, out.read_text()[-4000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in seen):
            time.sleep(0.2)
        left = {p: c for p, c in seen.items() if alive(p)}
        assert not left, f"left running after SIGTERM: {left}"
        assert "up: stopped" in out.read_text()
    finally:
        for pid in [proc.pid, *seen]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


@pytest.mark.slow
def test_sigterm_to_the_demo_stops_its_embedded_broker(tmp_path: Path) -> None:
    """`flywheel demo` runs the broker in its own session: SIGTERM used to end the demo at
    once (Python's default action) and leave Tansu running; now it unwinds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(tmp_path / "home")}
    out = tmp_path / "demo.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel", "demo", "--requests", "200000"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    broker: list[int] = []
    try:

        def broker_started() -> bool:
            broker[:] = [p for p, c in descendants(proc.pid).items() if "tansu" in c]
            return bool(broker)

        wait_for("the demo's broker", broker_started, START_S, proc, out)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM, out.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and alive(broker[0]):
            time.sleep(0.2)
        assert not alive(broker[0]), "the demo's broker outlived it"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in broker:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def test_sigterm_during_start_up_stops_the_phase_and_the_broker(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env |= {"FLYWHEEL_HOME": str(tmp_path / "home")}
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flywheel", "up", "--port", "0", "--no-panel"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    seen: dict[int, str] = {}
    try:

        def in_first_model() -> bool:
            seen.update(descendants(proc.pid))
            return "up: first model" in out.read_text() and any(
                "flywheel learn --once" in c for c in seen.values()
            )

        wait_for("the first-model phase", in_first_model, START_S, proc, out)
        assert any("tansu" in c for c in seen.values())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, out.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in seen):
            time.sleep(0.2)
        assert not {p: c for p, c in seen.items() if alive(p)}
        assert "up: ready:" not in out.read_text()
    finally:
        for pid in [proc.pid, *seen]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
