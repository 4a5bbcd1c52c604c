"""Reading corrections in step with predictions, by record timestamp.

A correction is produced after the prediction it corrects. A worker reading a backlog of
both topics (a restart after downtime, a new group, a burst) would otherwise meet them
in whatever order each partition's fetches return, and a correction met before its
prediction is written `pending` and joined by a second write when the prediction comes
-- twice the store work, and a later join. Like Kafka Streams' timestamp synchronization
(KIP-353), the worker holds back a correction whose timestamp is later than the
predictions read so far, while a predictions partition still has records to read; caught
up, nothing is held. A held correction is not committed (its partition's offset stops at
the first held record), so a crash or a rebalance replays it; it is released after
`max_hold_s` whatever the predictions do, and the corrections partitions are paused while
too many are held, so memory stays bounded.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

Partition = tuple[str, int]


def record_time(message: Any) -> float | None:
    """The record's timestamp in ms, None if it has none."""
    kind, ts = message.timestamp()
    return ts if kind and ts >= 0 else None


class Aligner:
    """Decides, poll by poll, which corrections to process now."""

    def __init__(self, leader: str, follower: str, *, max_held: int, max_hold_s: float) -> None:
        self.leader, self.follower = leader, follower
        self.max_held, self.max_hold_s = max_held, max_hold_s
        self._leader_time: dict[int, float] = {}  # partition -> last record time read
        self.leader_next: dict[int, int] = {}  # partition -> next offset to read
        self._held: dict[Partition, deque[tuple[Any, float]]] = {}  # (message, held since)

    @property
    def held(self) -> int:
        return sum(len(q) for q in self._held.values())

    def admit(
        self,
        messages: Iterable[Any],
        lagging: Callable[[int], bool],
        leader_partitions: Iterable[int],
        now: float,
        limit: int,
    ) -> tuple[list[Any], dict[Partition, int]]:
        """The messages to process now (at most `limit` corrections released at once, so
        a batch stays the size of a poll), and the next offset to commit for each
        partition they (or the held ones) belong to. `lagging(p)`: predictions partition
        p has records not yet read."""
        out: list[Any] = []
        offsets: dict[Partition, int] = {}
        for m in messages:
            tp = (m.topic(), m.partition())
            if tp[0] == self.follower:
                self._held.setdefault(tp, deque()).append((m, now))
                continue
            out.append(m)
            offsets[tp] = m.offset() + 1
            if tp[0] == self.leader:
                self.leader_next[tp[1]] = offsets[tp]
                ts = record_time(m)
                if ts is not None:
                    self._leader_time[tp[1]] = ts
        frontier = self._frontier(lagging, leader_partitions)
        room = max(0, limit - len(out))
        for tp in list(self._held):
            queue = self._held[tp]
            while queue and room:
                m, since = queue[0]
                ts = record_time(m)
                if ts is not None and ts > frontier and now - since < self.max_hold_s:
                    break  # and everything after it in this partition: offsets stay simple
                queue.popleft()
                out.append(m)
                offsets[tp] = m.offset() + 1
                room -= 1
            if queue:
                offsets[tp] = queue[0][0].offset()  # commit no further than the first held
            else:
                del self._held[tp]
        return out, offsets

    def _frontier(self, lagging: Callable[[int], bool], leader_partitions: Iterable[int]) -> float:
        """Corrections up to this time may go: the earliest read position among the
        predictions partitions that are behind (none behind: everything may go)."""
        behind = [p for p in leader_partitions if lagging(p)]
        if not behind:
            return math.inf
        return min(self._leader_time.get(p, -math.inf) for p in behind)

    def full(self) -> bool:
        """Too many corrections held: stop fetching more until some are released."""
        return self.held >= self.max_held

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Partitions revoked: their held records are the next owner's (uncommitted)."""
        for tp in partitions:
            self._held.pop(tp, None)
            if tp[0] == self.leader:
                self._leader_time.pop(tp[1], None)
                self.leader_next.pop(tp[1], None)
