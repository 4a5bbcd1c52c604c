"""What every benchmark's JSON document shares: the machine's facts, the load average
before and after the run, the date and the command.

A figure means little without the machine it came from: the CPUs, the library versions,
and how busy the machine was (a shared 2-core VM moves a figure by 10-30 %; the load
average at the start and at the end says whether a run was disturbed). Thirteen
benchmarks repeated this block; it lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from typing import Any


@contextlib.contextmanager
def quiet_loggers(levels: dict[str, int]) -> Iterator[None]:
    """Raise the named loggers' levels while a benchmark runs, and put them back after: a
    smoke test runs benchmarks in the test process, where a level left at ERROR empties
    every later test's caplog."""
    before = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def machine() -> dict[str, Any]:
    """What the figures depend on: CPUs, library versions, and the load average now
    (`loadavg_start`; `document` adds `loadavg_end`)."""
    import numpy as np
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "river": metadata.version("river"),
        "numpy": np.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


def now() -> str:
    """The document's date: UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def document(
    benchmark: str,
    info: dict[str, Any],
    fields: dict[str, Any] | None = None,
    *,
    date: str | None = None,
    command: bool = True,
) -> dict[str, Any]:
    """A benchmark's JSON document: its name, date, command line and `info` (from
    `machine`, given the load average now as `loadavg_end`), then `fields` in order."""
    info["loadavg_end"] = list(os.getloadavg())
    doc: dict[str, Any] = {"benchmark": benchmark, "date": date or now()}
    if command:
        doc["command"] = f"python -m bench {benchmark} " + " ".join(sys.argv[2:])
    doc["machine"] = info
    doc.update(fields or {})
    return doc


def load_range(m: dict[str, Any]) -> str:
    """ "0.52 -> 1.10": the 1-minute load average at the start and at the end."""
    return f"{m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}"


def machine_line(m: dict[str, Any], date: str) -> str:
    """The dim footer the learner benchmarks print under their tables."""
    return (
        f"[dim]{m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} thread), river {m['river']}, "
        f"load average {load_range(m)}, {date}[/]"
    )
