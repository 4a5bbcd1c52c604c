"""The private examples since a change, which DP updates may train on again.

After a detected change the non-private learner trains every update on all examples
since it (learner/trainer.py). A DP update may do the same only as the accountant
allows: each reuse puts the example's privacy unit (its source) into one more mechanism,
so a reused row goes through the budget planner and the ledger like a new one, before
anything trains (`PrivateStep.plan`). This class only remembers rows; it never decides
whether a row may be used.

The window keeps the newest `capacity` rows the learner trained on (accounted rows, in
id order), whether or not a change is open, so a change detected on a batch that has
already trained still finds that batch's rows: `open(since_id)` makes the rows from that
id on reusable; `close()` ends it (the boost after the change has settled).
"""

from __future__ import annotations

from collections.abc import Iterable

from flywheel.learner.example_source import StoredExample


class ChangeWindow:
    """The newest trained private rows, and the id from which they may be reused."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"window capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.since: int | None = None  # None: no change open, nothing to reuse
        self._rows: dict[int, StoredExample] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def open(self, since_id: int) -> None:
        """A change was detected at example `since_id`: rows from it on may be reused."""
        self.since = int(since_id)
        for i in [i for i in self._rows if i < self.since]:
            del self._rows[i]

    def close(self) -> None:
        self.since = None

    def add(self, rows: Iterable[StoredExample]) -> None:
        """Rows that were accounted and trained on (new ones, or reused ones again)."""
        for row in rows:
            if self.since is None or row.id >= self.since:
                self._rows[row.id] = row
        if len(self._rows) > self.capacity:
            for i in sorted(self._rows)[: len(self._rows) - self.capacity]:
                del self._rows[i]

    def drop(self, contributors: Iterable[str]) -> int:
        """Forget the rows of `contributors` (their budget is spent: they can never be
        reused); returns how many rows went."""
        gone = set(contributors)
        ids = [i for i, r in self._rows.items() if r.contributor in gone]
        for i in ids:
            del self._rows[i]
        return len(ids)

    def reusable(self, exclude: Iterable[int] = ()) -> list[StoredExample]:
        """Rows since the open change, oldest first, except the ids in `exclude`."""
        if self.since is None:
            return []
        skip = set(exclude)
        return [self._rows[i] for i in sorted(self._rows) if i not in skip]


__all__ = ["ChangeWindow"]
