"""A PostgreSQL server of a test's own, for tests that kill and restart the database.

The machine's PostgreSQL (127.0.0.1:5432) is shared and must never be stopped; a test that
needs an outage starts this one instead: `initdb` into a temp folder, the server on a free
loopback port with its socket in that folder. Debian's `initdb`/`pg_ctl` refuse to run as
root, so as root they run as the `postgres` user (`runuser`). `kill()` is `pg_ctl stop -m
immediate`: every server process quits at once, as in a crash, and `start()` recovers.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from flywheel.broker import free_port

__all__ = ["PgServer", "find_pg_bin"]


def find_pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (PATH first, then Debian's versioned folders)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    return Path(versions[0]).parent if versions else None


class PgServer:
    """`start()`, `kill()`, `start()` again, `close()` (always: it kills and deletes)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        # not under pytest's tmp_path: that is private to root, and the server runs as postgres
        self.root = Path(tempfile.mkdtemp(prefix="fw-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")
        self.root.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout_s: float = 120) -> None:
        out = subprocess.run(
            [*self._as, str(self.bin_dir / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr[-2000:]}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        # fsync off: a killed server loses nothing the OS holds (only a machine crash
        # would); synchronous_commit stays on, or a kill loses commits the client saw
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "120",
            "-o",
            options,
        )

    def kill(self) -> None:
        """Every server process quits at once, as in a crash (no checkpoint, no goodbye)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")

    def close(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
