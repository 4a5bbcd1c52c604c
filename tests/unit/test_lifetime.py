"""flywheel.lifetime: a child started with the parent-death signal ends with its parent."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from flywheel.lifetime import parent_death_signal
from tests.deadlines import deadline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

PARENT = """
import subprocess, sys, time
from flywheel.lifetime import parent_death_signal
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         preexec_fn=parent_death_signal(), start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_child_of_a_sigkilled_parent_is_stopped():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(deadline(10))
        end = time.monotonic() + deadline(10)
        while _alive(child) and time.monotonic() < end:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        for pid in (child, parent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_nothing_is_set_off_the_main_thread():
    """The signal follows the thread that forked: a worker thread's child would die with
    the thread, so only the main thread arms it."""
    found: list[object] = []
    t = threading.Thread(target=lambda: found.append(parent_death_signal()))
    t.start()
    t.join()
    assert found == [None]
    assert callable(parent_death_signal())
