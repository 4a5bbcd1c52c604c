"""A bounded, uniform, deterministic sample of the rows streamed past (reservoir).

What the initial model trains on and the reference statistics are computed from: a
file larger than RAM cannot be held, so at most `capacity` rows are (Vitter's algorithm
R, vectorized per chunk, seeded: the same file gives the same sample). Every row has the
same chance, `capacity / rows`, to be in it; a set smaller than `capacity` is kept whole,
in file order.
"""

from __future__ import annotations

import numpy as np


class Reservoir:
    """At most `capacity` rows of (x, y), a uniform sample of all rows `add`ed.

    >>> r = Reservoir(3, seed=1)
    >>> r.add(np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(5))
    >>> x, y = r.arrays()
    >>> x.shape, len(y), r.seen
    ((3, 2), 3, 5)
    """

    def __init__(self, capacity: int, *, seed: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._x: np.ndarray | None = None
        self._y = np.empty(capacity, dtype=np.int64)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        n = len(y)
        if n == 0:
            return
        if self._x is None:
            self._x = np.empty((self.capacity, x.shape[1]), dtype=np.float32)
        free = max(0, min(self.capacity - self.seen, n))
        if free:
            self._x[self.seen : self.seen + free] = x[:free]
            self._y[self.seen : self.seen + free] = y[:free]
        if free < n:
            # row i (0-based over all rows) replaces slot j ~ U[0, i] when j < capacity;
            # a later row overwrites an earlier one in the same slot, as in the serial loop
            index = self.seen + np.arange(free, n)
            slot = (self._rng.random(len(index)) * (index + 1)).astype(np.int64)
            keep = slot < self.capacity
            rows = np.arange(free, n)[keep]
            self._x[slot[keep]] = x[rows]
            self._y[slot[keep]] = y[rows]
        self.seen += n

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of the sample (copies)."""
        size = min(self.seen, self.capacity)
        if self._x is None:
            return np.empty((0, 0), np.float32), np.empty(0, np.int64)
        return self._x[:size].copy(), self._y[:size].copy()
