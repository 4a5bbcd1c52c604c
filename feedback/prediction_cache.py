"""The predictions a worker stored most recently, in memory, for joining their corrections.

A correction usually arrives seconds to minutes after its prediction, on the partition of
the same number (both are keyed by prediction id), so the worker that stored the
prediction is the one that reads the correction. Keeping what it stored lets it join the
correction as it is written -- inserted as `joined`, no lookup, no second write of the
row -- instead of reading the prediction back from the store. A miss (a day-late
correction, a restarted worker) reads the store; the cache is never the only copy.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import NamedTuple

from flywheel.events import PredictionEvent


class KnownPrediction(NamedTuple):
    """What a join needs of a stored prediction."""

    model_name: str
    model_version: str
    features: list[float]
    probabilities: dict[str, float]
    label: str
    predicted_at: datetime | None = None  # the prediction's timestamp (its outcome's)

    @classmethod
    def of(cls, event: PredictionEvent) -> KnownPrediction:
        return cls(
            event.model_name,
            event.model_version,
            event.features,
            event.probabilities,
            event.label,
            event.timestamp,
        )


class PredictionCache:
    """The last `capacity` predictions a worker stored (first in, first out).

    Only predictions whose row this worker inserted, after its transaction committed,
    are added: what is here is exactly what the store holds.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, KnownPrediction] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, prediction_id: str) -> KnownPrediction | None:
        return self._items.get(prediction_id)

    def update(self, known: dict[str, KnownPrediction]) -> None:
        """Add stored predictions, by id."""
        if not self.capacity:
            return
        items = self._items
        items.update(known)
        while len(items) > self.capacity:
            items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
