"""Processes that tests start: each in its own process group, killed with its group at
teardown (a failed test's too), and the check that no test leaves one behind.

Why: a `make test` run failed `test_feedback_crash[sqlite]` and its `flywheel feedback`
process stayed up for 14 minutes. Three parts:

- `ProcessGroup.start(...)` (the `processes` fixture): `subprocess.Popen` in a new session;
  `close()` sends SIGTERM to every group, waits, then SIGKILLs what is left (and the group's
  own children with it).
- Every process of a test session is tagged: `mark_session()` puts `RUN_VAR` (a path:
  "<parent session's tag>/<id>") into this session's environment, which every child inherits
  (also one re-parented to init after its parent died). `tagged(...)` finds them by reading
  /proc/<pid>/environ.
- conftest.py checks after each test that the test left no tagged process behind (teardown
  error, the processes listed and killed) and, at session end, that the whole run left none.

A child whose environment a test builds from nothing (not from `os.environ`) carries no tag:
start it through `processes`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tests.deadlines import deadline

__all__ = [
    "RUN_VAR",
    "ProcessGroup",
    "Tagged",
    "describe",
    "kill",
    "mark_session",
    "tagged",
    "wait_gone",
]

RUN_VAR = "PYTEST_FW_RUN"  # not FLYWHEEL_: settings reject unknown FLYWHEEL_ variables
# Long-lived helpers the test process itself starts on first use and keeps until it exits.
SESSION_HELPERS = (
    "multiprocessing.resource_tracker",
    "multiprocessing.forkserver",
    "compile_worker",
)
_PROC = Path("/proc")


class Tagged(NamedTuple):
    pid: int
    ppid: int
    tag: str
    cmdline: str


def mark_session() -> str:
    """Tag this session and every process it starts: "<parent's tag>/<id>", the parent
    being the session that started this one (pytest-xdist's controller for a worker, an
    outer test for a nested pytest run). Returns the tag.

    A check sees only its own session's subtree: a worker never counts another worker's
    processes (nor its broker) as its own, and a nested session never counts the outer
    session's, while the outer test still sees whatever the nested one left."""
    inherited = os.environ.get(RUN_VAR, "")
    own = uuid.uuid4().hex[:12]
    tag = f"{inherited}/{own}" if inherited else own
    os.environ[RUN_VAR] = tag
    return tag


def _tag_of(pid: str) -> str | None:
    try:
        raw = (_PROC / pid / "environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return None
    key = RUN_VAR.encode() + b"="
    for entry in raw.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key) :].decode(errors="replace")
    return None


def _stat(pid: str) -> tuple[int, str] | None:
    """(ppid, state) from /proc/<pid>/stat."""
    try:
        stat = (_PROC / pid / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def tagged(session: str) -> list[Tagged]:
    """Live processes (not this one, no zombies, none of this process's own
    `SESSION_HELPERS`) started by session `session` or by a session it started. (A
    process's /proc environ is the one it started with: an xdist worker shows its
    controller's tag, so the controller's check would count it -- once it has exited.)"""
    me = os.getpid()
    found = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        tag = _tag_of(entry.name)
        if tag is None or (tag != session and not tag.startswith(f"{session}/")):
            continue
        stat = _stat(entry.name)
        if stat is None or stat[1] in ("Z", "X"):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[0] == me and any(h in cmd for h in SESSION_HELPERS):
            continue
        found.append(Tagged(int(entry.name), stat[0], tag, cmd.strip()))
    return found


def describe(procs: Iterable[Tagged]) -> str:
    return "\n".join(f"  pid {p.pid} (parent {p.ppid}): {p.cmdline[:300]}" for p in procs)


def kill(procs: Iterable[Tagged]) -> None:
    """SIGKILL each process, with its group where it leads one."""
    for p in procs:
        try:
            if os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, signal.SIGKILL)
            else:
                os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_gone(pids: Sequence[int], timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` for the processes to end (or become zombies); those still
    running."""
    end = time.monotonic() + timeout_s
    while True:
        left = [pid for pid in pids if (s := _stat(str(pid))) is not None and s[1] not in "ZX"]
        if not left or time.monotonic() >= end:
            return left
        time.sleep(0.05)


@dataclass
class ProcessGroup:
    """Processes started by one test, each the leader of its own process group."""

    stop_timeout_s: float = 10.0
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def start(self, args: Sequence[str | os.PathLike[str]], **popen: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen(args, **popen)` in a new session (its own process group)."""
        if popen.get("start_new_session") is False or "process_group" in popen:
            raise ValueError("ProcessGroup starts every process in a session of its own")
        proc: subprocess.Popen[Any] = subprocess.Popen(args, start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def stop(
        self,
        proc: subprocess.Popen[Any],
        sig: int = signal.SIGTERM,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """Send `sig` to the process's group, wait `deadline(timeout_s)` (default
        `stop_timeout_s`), then SIGKILL the group; the process's exit code."""
        wait_s = deadline(self.stop_timeout_s if timeout_s is None else timeout_s)
        if proc in self.procs:
            self.procs.remove(proc)
        _signal_group(proc, sig)
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            return proc.wait(timeout=wait_s)
        finally:
            _signal_group(proc, signal.SIGKILL)  # what the leader left in its group

    def close(self) -> None:
        """Stop every process (newest first), SIGTERM then SIGKILL, groups included."""
        while self.procs:
            proc = self.procs[-1]
            try:
                self.stop(proc)
            finally:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    # an empty group is gone already (a zombie leader's group is still there: also fine)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
