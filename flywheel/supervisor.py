"""Supervised child processes for `flywheel up`: start, watch, restart with backoff, stop.

Each child runs in its own process group (its own session), so a stop reaches whatever
it started too: SIGTERM to the group, SIGKILL to the group after `stop_timeout_s`. A
child that exits while the supervisor runs is started again after a capped exponential
backoff (`flywheel.retry.Backoff`); a child that then stays up for `stable_s` starts its
backoff over. Every child's output goes, line by line, into its own log file; the last
line is kept for the status panel.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from flywheel.lifetime import parent_death_signal
from flywheel.retry import Backoff

__all__ = ["Child", "ChildSpec", "Supervisor"]


@dataclass(frozen=True)
class ChildSpec:
    """What to run: a name for the panel and the log file, argv, extra environment."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    stop_last: bool = False  # stopped after the others (the broker: their last flushes)


@dataclass
class Child:
    """One supervised child's live state (read by the panel; written by the supervisor)."""

    spec: ChildSpec
    state: str = "waiting"  # waiting | starting | running | backoff | exited | stopped
    pid: int | None = None
    restarts: int = 0
    last_line: str = ""
    last_exit: int | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    attempt: int = 0
    proc: subprocess.Popen[bytes] | None = None
    reader: threading.Thread | None = None


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class Supervisor:
    """Runs `ChildSpec`s as process groups, restarting the ones that exit, until `stop()`."""

    def __init__(
        self,
        log_dir: Path,
        *,
        backoff: Backoff | None = None,
        stable_s: float = 60.0,
        stop_timeout_s: float = 15.0,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.backoff = backoff or Backoff(1.0, 30.0)
        self.stable_s = stable_s
        self.stop_timeout_s = stop_timeout_s
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.children: dict[str, Child] = {}
        self._lock = threading.Lock()
        self._stopping = False
        log_dir.mkdir(parents=True, exist_ok=True)

    # -- starting ------------------------------------------------------------------------

    def add(self, spec: ChildSpec) -> Child:
        """Start `spec` now and supervise it from here on."""
        if spec.name in self.children:
            raise ValueError(f"a child named {spec.name!r} is already supervised")
        child = Child(spec)
        self.children[spec.name] = child
        self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        env = {**self.base_env, **child.spec.env}
        child.state = "starting"
        log_file = open(self.log_dir / f"{child.spec.name}.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(child.spec.argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a stop reaches its children too
                preexec_fn=parent_death_signal(),  # and a SIGKILLed `up` leaves no orphan
            )
        except OSError as exc:
            log_file.close()
            child.state = "backoff"
            child.last_line = f"cannot start: {exc}"
            child.next_start = time.monotonic() + self.backoff.delay(child.attempt)
            child.attempt += 1
            return
        child.proc, child.pid = proc, proc.pid
        child.started_at = time.monotonic()
        child.state = "running"
        assert proc.stdout is not None
        child.reader = threading.Thread(
            target=self._read, args=(child, proc.stdout, log_file), daemon=True
        )
        child.reader.start()

    @staticmethod
    def _read(child: Child, stream: IO[bytes], log_file: IO[bytes]) -> None:
        with stream, log_file:
            for raw in stream:
                log_file.write(raw)
                log_file.flush()
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    child.last_line = line

    # -- watching ------------------------------------------------------------------------

    def poll(self) -> list[Child]:
        """One round: note exits, restart the children whose backoff is over. Returns the
        children that exited in this round."""
        exited: list[Child] = []
        now = time.monotonic()
        with self._lock:
            if self._stopping:
                return exited
            for child in self.children.values():
                proc = child.proc
                if proc is not None and child.state == "running":
                    code = proc.poll()
                    if code is None:
                        if now - child.started_at >= self.stable_s:
                            child.attempt = 0  # up long enough: the next crash starts over
                        continue
                    _kill_group(proc.pid, signal.SIGKILL)  # whatever it left behind
                    if child.reader is not None:
                        child.reader.join(2.0)
                    child.last_exit, child.pid, child.proc = code, None, None
                    child.state = "backoff"
                    child.next_start = now + self.backoff.delay(child.attempt)
                    child.attempt += 1
                    exited.append(child)
                elif child.state == "backoff" and now >= child.next_start:
                    child.restarts += 1
                    self._spawn(child)
        return exited

    # -- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every child's group, then SIGKILL what is left after `stop_timeout_s`;
        the `stop_last` children once the others are gone. Nothing restarts once this begins."""
        with self._lock:
            self._stopping = True
            children = list(reversed(self.children.values()))
            self._stop_group([c for c in children if not c.spec.stop_last])
            self._stop_group([c for c in children if c.spec.stop_last])
            for child in children:
                child.state = "stopped"

    def _stop_group(self, children: list[Child]) -> None:
        running = [c for c in children if c.proc is not None]
        for child in running:
            assert child.proc is not None
            _kill_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in running:
            assert child.proc is not None
            try:
                child.last_exit = child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.last_line = f"killed after {self.stop_timeout_s:g}s"
            # the group's other members (a child's own children) go with it
            _kill_group(child.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.last_exit = child.proc.wait(5.0)
            if child.reader is not None:
                child.reader.join(2.0)
            child.proc, child.pid, child.state = None, None, "stopped"
