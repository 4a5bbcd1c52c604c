"""flywheel.supervisor: restart with capped backoff, stop reaches a child's own children."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from flywheel.retry import Backoff
from flywheel.supervisor import ChildSpec, Supervisor


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _until(condition, sup: Supervisor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, {n: c.state for n, c in sup.children.items()}
        sup.poll()
        time.sleep(0.05)


def test_a_crashed_child_restarts_after_a_growing_capped_pause(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, backoff=Backoff(0.2, 0.4), stable_s=3600)
    crash = sup.add(
        ChildSpec("crash", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    )
    try:
        _until(lambda: crash.restarts >= 3, sup)
        assert crash.last_exit == 3
        assert crash.last_line == "boom"
        assert crash.attempt >= 3  # never reset: it never stayed up
        assert (tmp_path / "crash.log").read_text().count("boom") >= 3
    finally:
        sup.stop()
    assert crash.state == "stopped" and crash.pid is None


def test_stop_ends_every_child_and_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    script = (
        "import subprocess, sys, time, pathlib\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"pathlib.Path({str(pidfile)!r}).write_text(str(p.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    sup = Supervisor(tmp_path, stop_timeout_s=5)
    first = sup.add(ChildSpec("parent", [sys.executable, "-c", script]))
    last = sup.add(
        ChildSpec("broker", [sys.executable, "-c", "import time; time.sleep(600)"], stop_last=True)
    )
    _until(lambda: pidfile.exists() and pidfile.read_text() != "", sup)
    grandchild = int(pidfile.read_text())
    pids = [first.pid, last.pid, grandchild]
    assert all(p is not None and _alive(p) for p in pids)
    sup.stop()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids if p) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if p and _alive(p)]
    assert first.state == last.state == "stopped"
    sup.poll()  # nothing restarts after a stop
    assert first.pid is None and first.restarts == 0


def test_the_up_panel_shows_each_child_and_the_loop(tmp_path: Path) -> None:
    from rich.console import Console

    from flywheel.cli.up import Layout, Watch, panel_of
    from flywheel.settings import load_settings

    sup = Supervisor(tmp_path)
    child = sup.add(ChildSpec("serve-0", [sys.executable, "-c", "print('hello there')"]))
    _until(lambda: child.last_line == "hello there", sup)
    layout = Layout(tmp_path, "127.0.0.1:9", [8123], "sqlite://", "sqlite://", "k.key", "k.pub")
    watch = Watch(layout, load_settings(home=tmp_path))
    watch.version, watch.lag = "4", 17
    console = Console(record=True, width=160)
    console.print(panel_of(sup, watch, layout))
    text = console.export_text()
    assert "serving v4 on http://127.0.0.1:8123" in text
    assert "feedback lag 17" in text
    assert "serve-0" in text and "hello there" in text
    sup.stop()
