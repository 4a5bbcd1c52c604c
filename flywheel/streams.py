"""Labelled data streams for seed data and the simulated production app.

A concept is one river `RandomRBF` generator: the same features, a different mapping
to labels. Switching concept mid-stream is an abrupt concept change.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

N_FEATURES = 8
LABELS = ("class_0", "class_1", "class_2")


@dataclass(frozen=True)
class Concept:
    """One mapping from features to labels, identified by its model seed.

    `offset` moves the inputs: a concept that appears in a region the seed data never
    covered, so learning it need not overwrite what the trusted holdout still checks.
    """

    model_seed: int
    offset: float = 0.0

    def sample(self, n: int, sample_seed: int) -> tuple[np.ndarray, list[str]]:
        from river.datasets import synth

        gen = synth.RandomRBF(
            seed_model=self.model_seed,
            seed_sample=sample_seed,
            n_classes=len(LABELS),
            n_features=N_FEATURES,
            n_centroids=12,
        )
        xs, ys = [], []
        for x, y in gen.take(n):
            xs.append([x[i] for i in range(N_FEATURES)])
            ys.append(LABELS[y])
        return np.asarray(xs, dtype=np.float32) + np.float32(self.offset), ys

    def stream(self, sample_seed: int, chunk: int = 1000) -> Iterator[tuple[list[float], str]]:
        offset = 0
        while True:
            xs, ys = self.sample(chunk, sample_seed + offset)
            yield from zip(xs.tolist(), ys, strict=True)
            offset += 1


def seed_concept(seed: int) -> Concept:
    return Concept(model_seed=seed)


def drift_concept(seed: int, offset: float = 0.5) -> Concept:
    """What the demo's world changes to: another RBF concept, half-overlapping the old one."""
    return Concept(model_seed=seed + 1, offset=offset)
