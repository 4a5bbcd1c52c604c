"""The split of the trusted data set into trusted-train and the trusted holdout.

The rule, as stored in `trusted_sets.split_rule`: rows are taken in file order, counted
per label; the k-th row of a label (k = 0, 1, 2, ...) is trusted holdout when
k mod 5 == 1, else trusted train.

Why this rule:
- stratified: every label is split 4:1 on its own, so a rare label is in the holdout in
  proportion and a label with two rows has one on each side (a random or hashed split
  of a small set can leave a label out of train, where the model never learns it, or out
  of the holdout, where the gate never checks it); k = 0 is always train, so every label
  is in train;
- deterministic and streaming: one counter per label, no second pass, no random seed,
  and the same file gives the same split on every machine;
- spread through the file: in a file ordered by time the holdout covers all of it (a
  split at 80 % would hold out only the newest rows).
Its weakness: a file whose rows repeat in a cycle of 5 within a label would put one
phase of the cycle in the holdout; shuffle such a file first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flywheel.store import HOLDOUT_FRACTION

if TYPE_CHECKING:
    import numpy as np

EVERY = 5  # one row in EVERY of each label is holdout: HOLDOUT_FRACTION of the set
assert abs(1 / EVERY - HOLDOUT_FRACTION) < 1e-9
SPLIT_RULE = (
    f"per label, in file order: the k-th row of a label (k from 0) is holdout when "
    f"k mod {EVERY} == 1, else train"
)


class Splitter:
    """Which rows of each chunk are holdout, by `SPLIT_RULE`.

    >>> import numpy as np
    >>> s = Splitter()
    >>> s.holdout(np.array([0, 0, 1, 0, 1, 0, 0, 0, 0])).astype(int).tolist()
    [0, 1, 0, 0, 1, 0, 0, 0, 1]
    >>> s.holdout(np.array([1, 1, 1, 1, 1])).astype(int).tolist()  # label 1: k = 2 ... 6
    [0, 0, 0, 0, 1]
    """

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}  # label index -> rows of it so far

    def holdout(self, y: np.ndarray) -> np.ndarray:
        """A boolean mask over the chunk's label indices `y` (rows in file order)."""
        import numpy as np

        mask = np.zeros(len(y), dtype=bool)
        for label in np.unique(y).tolist():
            rows = np.flatnonzero(y == label)
            k = self.seen.get(label, 0) + np.arange(len(rows))
            mask[rows] = k % EVERY == 1
            self.seen[label] = self.seen.get(label, 0) + len(rows)
        return mask
