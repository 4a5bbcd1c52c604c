"""Client libraries' connection chatter as one line per outage, with a count and an end.

With the broker unreachable, librdkafka logged `Connection refused` for every producer the
event log made (one a second: about 300 lines a minute in the service's log) and
kafka-python about one line per reconnect attempt per client (`flywheel feedback` printed
21 before its one `error:` line). `ConnectionChatter` lets the first such line of an
outage through, marked, counts the rest without logging them, and logs one line when the
outage ends: when a component that knows (the event log's producer delivering again, a
dependency marked up) calls `outage_over`, or, failing that, when chatter starts again
after `quiet_s` without any (the end of the last one, then the start of a new one).

Installed on the root logger's handlers by the CLI (`install`), so it sees the records of
every logger below `kafka` and `flywheel.kafka` (librdkafka's `logger=`) and of the event
log's own spooling line.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

__all__ = ["ConnectionChatter", "install", "outage_over"]

log = logging.getLogger("flywheel.outage")

_LOGGERS = ("kafka", "flywheel.kafka")
_OWN = ("flywheel.service.event_log",)  # our line that repeats once per spool retry
_PATTERN = re.compile(
    r"connect|refused|disconnect|transport|brokers? (are )?down|unreachable|timed ?out|"
    r"metadata refresh|not ready|no route|resolve|unavailable|broken pipe|reset by peer|"
    r"unable to bootstrap",
    re.IGNORECASE,
)
_MARK = "flywheel_chatter"  # a record's decision, shared by every handler that sees it


def _is_chatter(record: logging.LogRecord) -> bool:
    name = record.name
    ours = any(name == n or name.startswith(n + ".") for n in _OWN)
    theirs = any(name == n or name.startswith(n + ".") for n in _LOGGERS)
    if not (ours or theirs) or record.levelno < logging.WARNING:
        return False
    return bool(_PATTERN.search(record.getMessage()))


class ConnectionChatter(logging.Filter):
    """A handler filter: the first connection complaint of an outage passes (marked), the
    rest are counted; `over()` logs the outage's end with its count and length."""

    def __init__(self, quiet_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.quiet_s = quiet_s
        self.clock = clock
        self._lock = threading.Lock()
        self.started: float | None = None  # the open outage's first complaint
        self.last = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        decided = getattr(record, _MARK, None)
        if decided is not None:  # another handler of the same record decided already
            return bool(decided)
        if not _is_chatter(record):
            setattr(record, _MARK, True)
            return True
        now = self.clock()
        with self._lock:
            if self.started is not None and now - self.last > self.quiet_s:
                self._close(now, ended=False)
            self.last = now
            if self.started is None:
                self.started = now
                self.suppressed = 0
                record.msg = (
                    f"{record.getMessage()} (further connection errors are counted, "
                    "not logged, until the connection is back)"
                )
                record.args = None
                setattr(record, _MARK, True)
                return True
            self.suppressed += 1
        setattr(record, _MARK, False)
        return False

    def over(self) -> None:
        """The connection works again: one line for the outage, if one was open."""
        with self._lock:
            if self.started is not None:
                self._close(self.clock(), ended=True)

    def _close(self, now: float, *, ended: bool) -> None:
        assert self.started is not None
        seconds, length, count = now - self.started, self.last - self.started, self.suppressed
        self.started, self.suppressed = None, 0
        if ended:
            log.warning(
                "connection back after %.0fs; %d more connection errors were not logged",
                seconds,
                count,
            )
        else:
            log.warning(
                "no connection errors for %.0fs; %d more were not logged in the %.0fs before",
                self.quiet_s,
                count,
                length,
            )


_installed: list[ConnectionChatter] = []


def install(quiet_s: float = 60.0) -> ConnectionChatter:
    """One `ConnectionChatter` on every handler of the root logger (again: no duplicate)."""
    chatter = _installed[0] if _installed else ConnectionChatter(quiet_s)
    if not _installed:
        _installed.append(chatter)
    for handler in logging.getLogger().handlers:
        if chatter not in handler.filters:
            handler.addFilter(chatter)
    return chatter


def outage_over() -> None:
    """Called where a connection is known to work again (the event log delivered, a
    dependency came back): ends the open outage's count with one line."""
    for chatter in _installed:
        chatter.over()
