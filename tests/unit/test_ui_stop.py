"""`flywheel ui` stops the MLflow server it started when it gets SIGTERM (issue 29)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys
from flywheel.cli.ui import run_process
# the stand-in for `mlflow ui`: a process that starts a worker of its own, as gunicorn does
child = "import subprocess, sys, time, pathlib; " \\
    "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); " \\
    "pathlib.Path(sys.argv[1]).write_text(f'{w.pid}'); time.sleep(600)"
sys.exit(run_process([sys.executable, "-c", child, sys.argv[1]]))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_stops_the_server_and_its_workers(tmp_path: Path) -> None:
    pidfile = tmp_path / "worker.pid"
    ui = subprocess.Popen([sys.executable, "-c", SCRIPT, str(pidfile)], start_new_session=True)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text()):
            assert time.monotonic() < deadline and ui.poll() is None
            time.sleep(0.05)
        worker = int(pidfile.read_text())
        assert _alive(worker)
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(30) == 0
        deadline = time.monotonic() + 20
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the MLflow stand-in's worker outlived `flywheel ui`"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ui.pid, signal.SIGKILL)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(worker, signal.SIGKILL)
        ui.wait(10)
