"""A generic asyncio micro-batcher: concurrent `submit` calls become one `run` call.

Used by the service's dynamic batching (`flywheel.service.batching`), but knows nothing
about models: an item goes in, its output comes out.

How a batch forms, on one event loop:

* The first `submit` while no batch is forming becomes the batch's *leader*. It yields
  once to the loop, so every request the loop is already handling in this turn joins.
* A lone client does not even pay for that yield: once a leader found no company while
  no recent batch held more than one row, the next `probe_every - 1` submits that find
  no batch forming run at once, in the caller; then one yields again to look for
  company. Concurrent callers are therefore noticed within `probe_every` requests.
* It then waits for more, but only while recent batches (the last `recent_s` seconds)
  were bigger than what has gathered: at most `max_wait_s` after its own submit, and
  not at all once the batch holds `max_size` rows or as many as the largest recent
  batch. A lone client therefore never waits: its batches hold one request, so the
  expected size is one.
* The leader then runs everything queued, oldest first, in batches of at most
  `max_size` rows (an item bigger than that runs alone), and sets every caller's result.

`run(items)` is called synchronously on the event loop thread, exactly where an
unbatched forward pass would run; it returns one output per item, in order. With `key`,
items with different keys never share a call (the service keys on the model snapshot,
so a batch is always computed by one model version). If `run` raises for a batch of
several items, each item is run again on its own: only the item(s) that fail get the
exception, every other caller gets its result.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class BatcherStats:
    batches: int = 0  # calls of `run` that succeeded (isolation re-runs included)
    items: int = 0
    rows: int = 0
    largest: int = 0  # most rows in one call
    waits: int = 0  # batches whose leader waited for more
    isolated: int = 0  # failed batches re-run item by item

    @property
    def mean_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class MicroBatcher(Generic[In, Out]):
    def __init__(
        self,
        run: Callable[[list[In]], Sequence[Out]],
        *,
        max_size: int = 128,
        max_wait_s: float = 0.002,
        size: Callable[[In], int] | None = None,
        key: Callable[[In], Hashable] | None = None,
        recent_s: float = 0.1,
        probe_every: int = 8,
    ) -> None:
        if max_size < 1 or max_wait_s < 0 or recent_s <= 0 or probe_every < 0:
            raise ValueError(
                "max_size >= 1, max_wait_s >= 0, recent_s > 0 and probe_every >= 0 are required"
            )
        self.run, self.max_size, self.max_wait_s = run, max_size, max_wait_s
        self._size = size or (lambda _: 1)
        self._key = key
        self.recent_s, self.probe_every = recent_s, probe_every
        self._solo_left = 0  # submits that may still run at once (no company seen)
        self.stats = BatcherStats()
        self._queue: deque[tuple[In, asyncio.Future[Out], int]] = deque()
        self._rows = 0  # rows queued
        self._leader = False
        self._target = 0  # the leader stops waiting once this many rows are queued
        self._waiter: asyncio.Future[None] | None = None
        # (finished at, rows) of recent batches, rows strictly decreasing from the left:
        # a sliding-window maximum, O(1) per batch however many batches a second run
        self._recent: deque[tuple[float, int]] = deque()

    async def submit(self, item: In) -> Out:
        """The output of `run` for `item`, computed in a batch with concurrent submits."""
        if self._solo_left > 0 and not self._leader:
            self._solo_left -= 1
            return self._run_solo(item)
        fut: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        n = self._size(item)
        self._queue.append((item, fut, n))
        self._rows += n
        if self._leader:
            if self._waiter is not None and self._rows >= self._target and not self._waiter.done():
                self._waiter.set_result(None)
            return await fut
        self._leader = True
        target = 0
        try:
            target = await self._gather(time.monotonic())
        except BaseException:
            fut.cancel()  # this caller is gone (cancelled): its item is skipped
            raise
        finally:  # even when cancelled: the queued callers must get their results
            self._leader = False
            items = self._drain()
        if target == 1 and items == 1:  # alone, and nothing suggests company is coming
            self._solo_left = max(self.probe_every - 1, 0)
        return fut.result()

    def _run_solo(self, item: In) -> Out:
        out = self.run([item])
        if len(out) != 1:
            raise RuntimeError(f"run returned {len(out)} outputs for 1 item")
        rows = self._size(item)
        s = self.stats
        s.batches, s.items, s.rows = s.batches + 1, s.items + 1, s.rows + rows
        s.largest = max(s.largest, rows)
        return out[0]

    def expected_rows(self, now: float | None = None) -> int:
        """The largest batch of the last `recent_s` seconds, at most `max_size`; 1 if none."""
        now = time.monotonic() if now is None else now
        while self._recent and now - self._recent[0][0] > self.recent_s:
            self._recent.popleft()
        return min(self.max_size, self._recent[0][1] if self._recent else 1)

    async def _gather(self, started: float) -> int:
        """Wait for company as described above; returns the expected batch size."""
        await asyncio.sleep(0)  # the requests of this loop turn join first
        target = self.expected_rows()
        remaining = started + self.max_wait_s - time.monotonic()
        if self._rows >= target or remaining <= 0:
            return target
        loop = asyncio.get_running_loop()
        self._target, self._waiter = target, loop.create_future()
        waiter = self._waiter

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        timer = loop.call_later(remaining, wake)
        self.stats.waits += 1
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return target

    def _drain(self) -> int:
        """Run everything queued; returns how many items were computed."""
        done = 0
        while self._queue:
            batch: list[tuple[In, asyncio.Future[Out]]] = []
            rows = 0
            while self._queue and (not batch or rows + self._queue[0][2] <= self.max_size):
                item, fut, n = self._queue.popleft()
                self._rows -= n
                if not fut.done():  # a cancelled caller's item is not computed
                    batch.append((item, fut))
                    rows += n
            if not batch:
                continue
            done += len(batch)
            if self._key is None:
                self._run(batch, rows)
            else:
                groups: dict[Hashable, list[tuple[In, asyncio.Future[Out]]]] = {}
                for entry in batch:
                    groups.setdefault(self._key(entry[0]), []).append(entry)
                for group in groups.values():
                    self._run(
                        group, sum(self._size(i) for i, _ in group) if len(groups) > 1 else rows
                    )
            while self._recent and self._recent[-1][1] <= rows:
                self._recent.pop()  # never the maximum again: this one is newer and bigger
            self._recent.append((time.monotonic(), rows))
        return done

    def _run(self, entries: list[tuple[In, asyncio.Future[Out]]], rows: int) -> None:
        items = [item for item, _ in entries]
        try:
            outs = self.run(items)
            if len(outs) != len(items):
                raise RuntimeError(f"run returned {len(outs)} outputs for {len(items)} items")
        except Exception as exc:
            if len(entries) == 1:
                fut = entries[0][1]
                if not fut.done():
                    fut.set_exception(exc)
                return
            self.stats.isolated += 1
            for entry in entries:  # only the failing item(s) fail
                self._run([entry], self._size(entry[0]))
            return
        s = self.stats
        s.batches, s.items, s.rows = s.batches + 1, s.items + len(items), s.rows + rows
        s.largest = max(s.largest, rows)
        for (_, fut), out in zip(entries, outs, strict=True):
            if not fut.done():
                fut.set_result(out)
