"""The import's progress bar: rich, on stderr, only for a person watching.

Off when stderr is not a terminal (a pipe, a log file, CI) or when asked (`--quiet`): a
bar redrawn into a log is noise. One bar per pass; CSV counts bytes read, Parquet rows.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


class Meter:
    """Progress bars, or nothing when `enabled` is False.

    >>> with Meter(enabled=False).task("reading", total=10) as advance:
    ...     advance(5)
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_terminal(cls, *, quiet: bool = False) -> Meter:
        return cls(enabled=not quiet and sys.stderr.isatty())

    @contextlib.contextmanager
    def task(
        self, description: str, *, total: int | None, unit: str = "rows"
    ) -> Iterator[Callable[[int], None]]:
        """A bar for one pass counting `unit` ("rows" or "bytes"); yields `update(done)`."""
        if not self.enabled:
            yield lambda done: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        amount = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            amount,
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda done: bar.update(task, completed=done)
            bar.update(task, completed=total)
