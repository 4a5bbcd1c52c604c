"""A durable cursor over the examples table that misses nothing and repeats nothing.

Example ids grow, but on PostgreSQL they are not *committed* in id order: two feedback
workers can commit id 12 after the learner has read id 13. A plain "id > last" cursor
would skip 12 forever. So the cursor keeps a watermark plus the id ranges it has
consumed above it; ids above the watermark that show up late are still read. The
watermark only moves past ids read more than `grace_s` ago, when any transaction that
took a smaller id has long committed. Quarantined examples are remembered too, so one
that is released to `train` later is picked up then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def _merge(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


@dataclass
class CursorState:
    watermark: int = 0  # every id <= watermark has been read
    above: list[list[int]] = field(default_factory=list)  # inclusive ranges read above it
    marks: list[list[float]] = field(default_factory=list)  # [read_at_unix, max_id_read]
    held: list[int] = field(default_factory=list)  # quarantined ids to look at again

    def consumed(self, example_id: int) -> bool:
        if example_id <= self.watermark:
            return True
        return any(lo <= example_id <= hi for lo, hi in self.above)

    def mark_read(self, ids: list[int], now: float | None = None) -> None:
        if not ids:
            return
        self.above = _merge(self.above + [[i, i] for i in ids])
        self.marks.append([time.time() if now is None else now, float(max(ids))])

    def advance(self, grace_s: float, now: float | None = None) -> None:
        """Move the watermark past what was read more than `grace_s` ago."""
        now = time.time() if now is None else now
        old = [m for m in self.marks if now - m[0] >= grace_s]
        if old:
            self.watermark = max(self.watermark, int(max(m[1] for m in old)))
            self.marks = [m for m in self.marks if now - m[0] < grace_s]
            self.above = [
                [max(lo, self.watermark + 1), hi] for lo, hi in self.above if hi > self.watermark
            ]

    @property
    def highest(self) -> int:
        return max([self.watermark] + [hi for _, hi in self.above])

    def to_dict(self) -> dict[str, Any]:
        return {
            "watermark": self.watermark,
            "above": self.above,
            "marks": self.marks,
            "held": self.held,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CursorState:
        data = data or {}
        return cls(
            int(data.get("watermark", 0)),
            [list(map(int, r)) for r in data.get("above", [])],
            [[float(a), float(b)] for a, b in data.get("marks", [])],
            [int(i) for i in data.get("held", [])],
        )
