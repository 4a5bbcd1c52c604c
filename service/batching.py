"""Dynamic batching for POST /v1/predict (FLYWHEEL_DYNAMIC_BATCHING).

Each request is validated first, against the model snapshot it took when it started
(a bad request is refused before it can join a batch), then submitted with that
snapshot. Concurrent requests are gathered by `flywheel.kernels.MicroBatcher`
(see there for when a batch waits) into one forward pass per model snapshot: a batch is
always computed by one `ServedModel`, so every response and prediction event names the
version that computed it; a hot swap between batches is fine, and requests that started
on the old version are still computed by it. Batches hold at most
FLYWHEEL_BATCH_MAX_SIZE instances and wait at most FLYWHEEL_BATCH_MAX_WAIT_MS.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, Metric

from flywheel.kernels import BatcherStats, MicroBatcher
from flywheel.service.model_holder import ServedModel
from flywheel.settings import ServiceSettings

Item = tuple[ServedModel, np.ndarray]
Output = tuple[np.ndarray, list[str]]


def run_batch(items: list[Item]) -> list[Output]:
    """One forward pass for requests that share a model snapshot; each gets its rows back."""
    model = items[0][0]
    if len(items) == 1:
        return [model.predict(items[0][1])]
    probs, paths = model.predict(np.concatenate([x for _, x in items]))
    out, start = [], 0
    for _, x in items:
        end = start + len(x)
        out.append((probs[start:end], paths[start:end]))
        start = end
    return out


class PredictBatcher:
    def __init__(self, service: ServiceSettings) -> None:
        self._batcher: MicroBatcher[Item, Output] = MicroBatcher(
            run_batch,
            max_size=service.batch_max_size,
            max_wait_s=service.batch_max_wait_ms / 1000.0,
            size=lambda item: len(item[1]),
            key=lambda item: id(item[0]),
        )

    async def predict(self, model: ServedModel, x: np.ndarray) -> Output:
        """(probabilities, path per row) for `x`, computed by `model` in a shared batch."""
        return await self._batcher.submit((model, x))

    @property
    def stats(self) -> BatcherStats:
        return self._batcher.stats


class BatchCollector:
    """The batcher's counters at scrape time (`/metrics`)."""

    def __init__(self, batcher: PredictBatcher) -> None:
        self._batcher = batcher

    def collect(self) -> Iterator[Metric]:
        s = self._batcher.stats
        for name, doc, value in (
            ("flywheel_batches", "Forward passes run by dynamic batching", s.batches),
            ("flywheel_batched_instances", "Instances computed in those passes", s.rows),
            ("flywheel_batched_requests", "Requests computed in those passes", s.items),
            ("flywheel_batch_isolations", "Failed batches re-run request by request", s.isolated),
        ):
            yield CounterMetricFamily(name, doc, value=value)
