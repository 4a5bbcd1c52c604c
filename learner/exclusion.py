"""How much incoming data the privacy budget keeps out of training, counted and told.

A privacy unit (a data subject, else a prediction) whose budget is spent is left out of
every later update of the lineage (for good under the lifetime policy, until its window
renews under the renewing one). That is the promise working, not a fault, but an operator
must see how much data it costs: the counters on the learner's /metrics, the totals kept
in the learner's state (the privacy report and the review page read them), and one log
line an hour at most. A line per update (the old warning) is a line a minute at the
default batch, and it said only how many units, not how much data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from flywheel.privacy import (
    EXCLUDED_EXAMPLES,
    EXCLUDED_SOURCES,
    EXCLUDED_STATE_KEY,
    INCOMING_EXAMPLES,
)

log = logging.getLogger(__name__)
LOG_EVERY_S = 3600.0
STATE_KEY = EXCLUDED_STATE_KEY  # in the learner's saved state (the report reads it)


class ExcludedData:
    """Totals of one lineage's incoming trainable examples and of those excluded.

    >>> lines = []
    >>> seen = ExcludedData("flywheel", clock=lambda: 0.0, say=lines.append)
    >>> seen.add(incoming=100, excluded=40, units=3)
    >>> seen.add(incoming=100, excluded=60, units=5)  # within the hour: counted, not told
    >>> seen.state(), len(lines)
    ({'incoming': 200, 'excluded': 100}, 1)
    """

    def __init__(
        self,
        lineage: str,
        *,
        every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.lineage = lineage
        self.every_s = every_s
        self.clock = clock
        self.say = say or log.warning
        self.incoming = self.excluded = 0  # since the lineage began (restored on start)
        self._told_at: float | None = None
        self._period = [0, 0, 0]  # incoming, excluded, units since the last line

    def restore(self, state: Mapping[str, Any] | None) -> None:
        """Totals from the learner's saved state (absent: none yet)."""
        state = state or {}
        self.incoming = int(state.get("incoming", 0))
        self.excluded = int(state.get("excluded", 0))

    def state(self) -> dict[str, int]:
        return {"incoming": self.incoming, "excluded": self.excluded}

    def add(self, *, incoming: int, excluded: int, units: int) -> None:
        """One planned update: `incoming` new trainable examples, `excluded` of them kept
        out (their `units` have spent their budget)."""
        self.incoming += incoming
        self.excluded += excluded
        INCOMING_EXAMPLES.labels(self.lineage).inc(incoming)
        if excluded:
            EXCLUDED_EXAMPLES.labels(self.lineage).inc(excluded)
            EXCLUDED_SOURCES.inc(units)
        p = self._period
        p[0], p[1], p[2] = p[0] + incoming, p[1] + excluded, p[2] + units
        now = self.clock()
        if p[1] and (self._told_at is None or now - self._told_at >= self.every_s):
            self.say(
                f"privacy budget of {self.lineage}: {p[1]} of {p[0]} incoming trainable "
                f"examples ({p[1] / max(p[0], 1):.0%}) could not be trained on"
                f"{'' if self._told_at is None else ' in the last hour'}: {p[2]} privacy "
                f"unit(s) had spent their budget; {self.excluded} of {self.incoming} so far "
                "(flywheel_privacy_excluded_examples_total; `flywheel privacy report`)"
            )
            self._told_at, self._period = now, [0, 0, 0]
