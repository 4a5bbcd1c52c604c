"""Children that do not outlive a killed parent: the kernel's parent-death signal.

A supervisor stops its children on SIGTERM or Ctrl-C, but a SIGKILL (the OOM killer, a
`kill -9`, a CI runner's timeout) runs no handler: `flywheel broker`'s Tansu, started in a
session of its own so that only we decide when it stops, kept running and holding its port
after its parent was killed, and so did `flywheel up`'s children (issue 29). On Linux
`prctl(PR_SET_PDEATHSIG)` asks the kernel to send the child a signal when its parent dies;
elsewhere nothing is set and the graceful stop is all there is.

The signal fires when the *thread* that started the child exits, not the process: so it
is set only for a child started from the main thread, whose end is the process's (a child
started from a worker thread would be killed when that thread ends).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["PR_SET_PDEATHSIG", "parent_death_signal"]

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def parent_death_signal(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen` that makes the child receive `sig` when the
    calling process dies; None (set nothing) off Linux or off the main thread.

    >>> import subprocess, sys
    >>> subprocess.run([sys.executable, "-c", "pass"],
    ...     preexec_fn=parent_death_signal(), check=True).returncode
    0
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    parent = os.getpid()
    # loaded here, in the parent: the child, between fork and exec, only makes the call
    # (a dlopen there could wait forever on a loader lock another thread held at the fork)
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl

    def arm() -> None:  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: act as if after
            os.kill(os.getpid(), int(sig))

    return arm
