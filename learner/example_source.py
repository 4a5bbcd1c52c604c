"""What the learner reads from the training store, through its cursor.

The SQL is the store's (`flywheel.store.ExampleReader`); this adds the cursor's protocol
(what is unread, which held examples came back) and the learner's use of the rows.
"""

from __future__ import annotations

import numpy as np

from flywheel.learner.cursor import CursorState
from flywheel.store import ExampleReader, StoredExample


class ExampleSource(ExampleReader):
    """Reads examples past a cursor, recent holdout corrections and replay samples."""

    def read_new(self, cursor: CursorState, limit: int) -> list[StoredExample]:
        """Unread non-seed examples in id order (any split), at most `limit`."""
        return self.unread(cursor.watermark, cursor.above, limit)

    def released(self, cursor: CursorState) -> tuple[list[StoredExample], list[int]]:
        """Held examples now trainable, and held ids never to train on (released to another
        split, or deleted): those can be forgotten; the trainable ones once they are used."""
        if not cursor.held:
            return [], []
        rows = self.by_ids(cursor.held)
        elsewhere = [r.id for r in rows if not r.trainable and not r.quarantined]
        gone = set(cursor.held) - {r.id for r in rows}
        return [r for r in rows if r.trainable], elsewhere + sorted(gone)


def bound_per_contributor(
    rows: list[StoredExample], limit: int | None
) -> tuple[dict[str, list[StoredExample]], int]:
    """Rows grouped by contributor, the first `limit` of each in the given order, and how
    many were cut: the contribution bound DP relies on (online and federated alike)."""
    groups: dict[str, list[StoredExample]] = {}
    for row in rows:
        groups.setdefault(row.contributor, []).append(row)
    if limit is None:
        return groups, 0
    cut = sum(max(0, len(g) - limit) for g in groups.values())
    return {c: g[:limit] for c, g in groups.items()}, cut


def as_arrays(
    rows: list[StoredExample], label_index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, label indices and weights; rows with a label the model lacks are dropped."""
    keep = [r for r in rows if r.label in label_index]
    if not keep:
        return (np.empty((0, 0), np.float32), np.empty(0, np.int64), np.empty(0, np.float32))
    x = np.asarray([r.features for r in keep], dtype=np.float32)
    y = np.asarray([label_index[r.label] for r in keep], dtype=np.int64)
    w = np.asarray([r.weight for r in keep], dtype=np.float32)
    return x, y, w
